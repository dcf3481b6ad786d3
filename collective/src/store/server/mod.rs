//! The store server: torch's TCPStore server, in tokio, on a thread of its own.
//!
//! # Guarantees
//! - Speaks torch 2.13's wire protocol, so `torch.distributed.TCPStore` clients, ferrun's
//!   [`super::StoreClient`] and the agents share one store.
//! - Waits never poll: a `WAIT` registers the connection, and the `SET`/`ADD`/`APPEND`/
//!   `COMPARE_SET`/`QUEUE_PUSH` that completes it wakes it.
//! - Serving runs on its own thread and runtime, so a busy launcher never stalls the workers'
//!   store.
//!
//! - Bounded: requests are parsed from what has arrived ([`super::request`]), so a declared
//!   length allocates nothing; the connections' buffers together stay under
//!   [`Limits::memory`], connections under [`Limits::max_connections`]; a client that stalls
//!   inside a request or before its handshake is dropped after [`Limits::stall`]; running out
//!   of file descriptors pauses accepting (logged once) instead of spinning.
//!
//! # Trust
//! By default anyone who reaches the port can read and write every key, as with torch's
//! store. It binds what the job needs (loopback for one node); [`StoreServer::admit`] narrows
//! who is served to loopback and named hosts ([`Admission`], judged on each connection's
//! source address when it is accepted). It trusts no length, count or opcode a client sends.
//!
//! # Caveats
//! A connection that breaks the protocol (bad magic, unknown opcode, oversized field) is
//! dropped, as torch's server does; the others are unaffected. Stored values are not capped
//! beyond the protocol's per-value limit.

use std::collections::HashSet;
use std::net::IpAddr;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};

use super::StoreError;

mod admission;
mod connection;
mod state;

pub use admission::Admission;
use connection::{connection, Budget};
use state::State;

/// What one server may hold at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Bytes all connections may buffer together (requests not yet whole); a connection that
    /// would go past it is dropped, with a log line.
    pub memory: usize,
    /// How long a client may send nothing before its handshake or inside a request before it
    /// is dropped (between requests it may stay idle: torch's clients do).
    pub stall: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: connection_cap(),
            memory: 1 << 30,
            stall: Duration::from_secs(30),
        }
    }
}

/// The connection cap: below the descriptor limit, leaving room for the launcher's own.
fn connection_cap() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    usize::try_from(soft.saturating_sub(64))
        .unwrap_or(usize::MAX)
        .clamp(16, 1 << 16)
}

/// Raises this process's soft limit on open files to its hard limit (a store serves a
/// connection per worker and agent); the limit in force after.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Bytes buffered by all connections together.
    budget: Budget,
    admission: RwLock<Admission>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than stopping the store would.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn admits(&self, ip: IpAddr) -> bool {
        self.admission
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .admits(ip)
    }
}

/// A running store server. Dropping it stops the server.
#[derive(Debug)]
pub struct StoreServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoreServer {
    /// Binds `addr` (port 0: a free port, kept — no race with another process) and serves.
    ///
    /// # Errors
    /// [`StoreError::AddrInUse`] when the port is taken, [`StoreError::Bind`] otherwise.
    pub fn bind(addr: SocketAddr) -> Result<Self, StoreError> {
        Self::bind_with(addr, Limits::default())
    }

    /// As [`StoreServer::bind`], with other limits.
    ///
    /// # Errors
    /// As [`StoreServer::bind`].
    pub fn bind_with(addr: SocketAddr, limits: Limits) -> Result<Self, StoreError> {
        let listener = StdListener::bind(addr).map_err(|source| match source.kind() {
            std::io::ErrorKind::AddrInUse => StoreError::AddrInUse { addr },
            _ => StoreError::Bind { addr, source },
        })?;
        crate::net::deepen_backlog(&listener);
        listener
            .set_nonblocking(true)
            .map_err(|source| StoreError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| StoreError::Bind { addr, source })?;
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            budget: Budget::new(limits.memory),
            admission: RwLock::default(),
        });
        let (stop, stopped) = oneshot::channel();
        let serving = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("ferrun-store".into())
            .spawn(move || {
                // Two serving threads where there are two cores: the store then keeps its share
                // of the machine beside busy workers (measured: `ferrun-bench store`).
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    // Clients woken in a burst overflow the workers' local queues into the
                    // global one: take from it every tick, so that none of them waits behind
                    // 60 turns of the others (the tail latency of a thousand clients).
                    .global_queue_interval(1)
                    .thread_name("ferrun-store")
                    .enable_all()
                    .build();
                match runtime {
                    Ok(rt) => rt.block_on(serve(listener, serving, limits, stopped)),
                    Err(e) => tracing::error!("store server cannot start its runtime: {e}"),
                }
            })
            .map_err(|source| StoreError::Bind { addr, source })?;
        Ok(Self {
            addr: local,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Binds the first of `[::]:port` (dual stack) and `0.0.0.0:port` that works.
    ///
    /// # Errors
    /// As [`StoreServer::bind`]; a port in use is reported as such.
    pub fn bind_any(port: u16) -> Result<Self, StoreError> {
        match Self::bind(SocketAddr::from(([0u16; 8], port))) {
            Err(StoreError::Bind { .. }) => Self::bind(SocketAddr::from(([0u8; 4], port))),
            other => other,
        }
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Forgets every key and queue (between attempts, so that a restarted group never reads a
    /// previous attempt's keys). Pending waits stay pending.
    pub fn clear(&self) {
        let mut state = self.shared.lock();
        state.data.clear();
        state.queues.clear();
    }

    /// Forgets every key and queue except those under `keep` (the agents' own namespace).
    pub fn clear_except(&self, keep: &str) {
        let mut state = self.shared.lock();
        state.data.retain(|k, _| k.starts_with(keep));
        state.queues.retain(|k, _| k.starts_with(keep));
    }

    /// The number of keys held.
    pub fn len(&self) -> usize {
        self.shared.lock().data.len()
    }

    /// Bytes the connections buffer now (requests not yet whole), under [`Limits::memory`].
    pub fn buffered_bytes(&self) -> usize {
        self.shared.budget.used.load(Ordering::Acquire)
    }

    /// Serves only the connections `admission` admits from now on (connections already open
    /// stay open).
    pub fn admit(&self, admission: Admission) {
        *self
            .shared
            .admission
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = admission;
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: StdListener,
    shared: Arc<Shared>,
    limits: Limits,
    mut stopped: oneshot::Receiver<()>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return tracing::error!("store server cannot listen: {e}"),
    };
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Said once a minute at most: a full server must not flood the log.
    let mut full_said: Option<std::time::Instant> = None;
    let mut refused = 0u64;
    // Hosts whose refusal was logged: each once, and at most a few, so a scan cannot flood it.
    let mut strangers_said: HashSet<IpAddr> = HashSet::new();
    loop {
        // A slot first: at the cap, new clients wait in the kernel's backlog.
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if full_said.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(
                        "store server: {} connections open, the most it serves; new clients wait \
                         until one closes",
                        limits.max_connections
                    );
                    full_said = Some(std::time::Instant::now());
                }
                tokio::select! {
                    _ = &mut stopped => return,
                    slot = Arc::clone(&slots).acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => return,
                    },
                }
            }
        };
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if refused > 0 {
                    tracing::warn!("store server: accepting again after {refused} failed accepts (out of file descriptors)");
                    refused = 0;
                }
                if !shared.admits(peer.ip()) {
                    let ip = peer.ip().to_canonical();
                    if strangers_said.len() < 16 && strangers_said.insert(ip) {
                        tracing::warn!(
                            "store server: refused a connection from {ip}: not a host of the \
                             job's current round (with a rendezvous token, only hosts the \
                             rendezvous admitted may use the store)"
                        );
                    }
                    continue;
                }
                let _ = stream.set_nodelay(true);
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = connection(stream, &shared, &limits).await {
                        tracing::debug!("store connection from {peer} closed: {e}");
                    }
                });
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) =>
            {
                // Out of descriptors or memory: accepting again at once would fail again (and
                // spin). Say so once, then retry as connections close, at most every 100 ms.
                if refused == 0 {
                    tracing::warn!(
                        "store server cannot accept connections: {e}; retrying as connections close \
                         (raise the limit with `ulimit -n`)"
                    );
                }
                refused += 1;
                drop(slot);
                tokio::select! {
                    _ = &mut stopped => return,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            // The client gave up before it was accepted (ECONNABORTED and the like).
            Err(e) => tracing::debug!("store server accept failed: {e}"),
        }
    }
}
