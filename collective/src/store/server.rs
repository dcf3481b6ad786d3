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
//! Anyone who reaches the port can read and write every key: the store has no authentication,
//! like torch's. It binds what the job needs (loopback for one node), and trusts no length,
//! count or opcode a client sends.
//!
//! # Caveats
//! A connection that breaks the protocol (bad magic, unknown opcode, oversized field) is
//! dropped, as torch's server does; the others are unaffected. Stored values are not capped
//! beyond the protocol's per-value limit.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::{Arc, Mutex, MutexGuard};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};

use super::request::{self, Parsed, Request};
use super::wire;
use super::StoreError;

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

#[derive(Debug, Default)]
struct State {
    data: HashMap<String, Vec<u8>>,
    queues: HashMap<String, VecDeque<Vec<u8>>>,
    /// key → ids of the waits that still need it.
    waiting: HashMap<String, Vec<u64>>,
    waits: HashMap<u64, Wait>,
    next_wait: u64,
}

#[derive(Debug)]
struct Wait {
    missing: usize,
    wake: oneshot::Sender<()>,
}

impl State {
    fn present(&self, key: &str) -> bool {
        self.data.contains_key(key) || self.queues.get(key).is_some_and(|q| !q.is_empty())
    }

    fn set(&mut self, key: String, value: Vec<u8>) {
        self.wake_all(&key);
        self.data.insert(key, value);
    }

    fn wake_all(&mut self, key: &str) {
        for id in self.waiting.remove(key).unwrap_or_default() {
            self.satisfy(id);
        }
    }

    /// A queue push completes at most one waiting pop.
    fn wake_one(&mut self, key: &str) {
        let Some(ids) = self.waiting.get_mut(key) else {
            return;
        };
        if ids.is_empty() {
            return;
        }
        let id = ids.remove(0);
        if ids.is_empty() {
            self.waiting.remove(key);
        }
        self.satisfy(id);
    }

    fn satisfy(&mut self, id: u64) {
        let done = match self.waits.get_mut(&id) {
            Some(w) => {
                w.missing -= 1;
                w.missing == 0
            }
            None => false,
        };
        if done {
            if let Some(w) = self.waits.remove(&id) {
                let _ = w.wake.send(());
            }
        }
    }

    /// Registers a wait for the missing `keys`; `None` when all are present already.
    fn wait(&mut self, keys: &[String]) -> Option<(u64, oneshot::Receiver<()>)> {
        let missing: Vec<&String> = keys.iter().filter(|k| !self.present(k)).collect();
        if missing.is_empty() {
            return None;
        }
        let id = self.next_wait;
        self.next_wait += 1;
        let (wake, rx) = oneshot::channel();
        for key in &missing {
            self.waiting.entry((*key).clone()).or_default().push(id);
        }
        self.waits.insert(
            id,
            Wait {
                missing: missing.len(),
                wake,
            },
        );
        Some((id, rx))
    }

    fn cancel(&mut self, id: u64) {
        if self.waits.remove(&id).is_some() {
            self.waiting.retain(|_, ids| {
                ids.retain(|&i| i != id);
                !ids.is_empty()
            });
        }
    }

    fn add(&mut self, key: String, delta: i64) -> Result<i64, String> {
        let current = match self.data.get(&key) {
            None => 0,
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .ok_or_else(|| format!("ADD on key {key:?} whose value is not an integer"))?,
        };
        let value = current.wrapping_add(delta);
        self.set(key, value.to_string().into_bytes());
        Ok(value)
    }

    fn compare_set(&mut self, key: String, expected: Vec<u8>, desired: Vec<u8>) -> Vec<u8> {
        let current = match self.data.get(&key) {
            None if expected.is_empty() => {
                self.set(key, desired.clone());
                return desired;
            }
            // torch answers the expected value for a missing key; clients rely on it.
            None => expected,
            Some(v) if *v == expected => {
                self.data.insert(key.clone(), desired.clone());
                desired
            }
            Some(v) => v.clone(),
        };
        self.wake_all(&key);
        current
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Bytes buffered by all connections together.
    budget: Budget,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than stopping the store would.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        listener
            .set_nonblocking(true)
            .map_err(|source| StoreError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| StoreError::Bind { addr, source })?;
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            budget: Budget::new(limits.memory),
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

/// TCP keepalive on a connection, so that the idle connection of a client whose host vanished
/// is closed by the kernel in the end rather than held forever.
#[allow(unsafe_code)]
fn keepalive(stream: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, a valid pointer to an int and its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Bytes buffered by all connections together, against [`Limits::memory`].
#[derive(Debug)]
struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    fn new(limit: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// A connection's receive buffer, its capacity counted against the budget.
struct Inbound<'a> {
    buf: Vec<u8>,
    /// Parsed bytes at the front of `buf`.
    start: usize,
    counted: usize,
    budget: &'a Budget,
}

impl Drop for Inbound<'_> {
    fn drop(&mut self) {
        self.budget.give(self.counted);
    }
}

/// Bytes a connection reads at most at a time.
const READ_CHUNK: usize = 256 * 1024;

impl Inbound<'_> {
    /// Makes room to read towards `need` bytes; `false` when the budget has none.
    fn room(&mut self, need: usize) -> bool {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let want = need.saturating_sub(self.buf.len()).clamp(4096, READ_CHUNK);
        if self.buf.capacity() - self.buf.len() < want {
            let before = self.buf.capacity();
            let target = self.buf.len() + want;
            if !self.budget.take(target - before) {
                return false;
            }
            self.buf.reserve_exact(target - self.buf.len());
            // reserve may round up; count what was taken.
            let extra = self.buf.capacity().saturating_sub(target);
            if extra > 0 && !self.budget.take(extra) {
                self.budget.give(target - before);
                return false;
            }
            self.counted += self.buf.capacity() - before;
        }
        true
    }

    /// Gives back the memory of a buffer that grew for a large request.
    fn shrink(&mut self) {
        if self.start == self.buf.len() && self.buf.capacity() > READ_CHUNK {
            self.buf = Vec::new();
            self.start = 0;
            self.budget.give(self.counted);
            self.counted = 0;
        }
    }
}

async fn connection(stream: TcpStream, shared: &Shared, limits: &Limits) -> std::io::Result<()> {
    let _ = keepalive(&stream);
    let (mut r, mut w) = stream.into_split();
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut inbound = Inbound {
        buf: Vec::new(),
        start: 0,
        counted: 0,
        budget: &shared.budget,
    };
    let mut out = Vec::with_capacity(256);
    let mut validated = false;
    let mut pending: Option<(u64, oneshot::Receiver<()>)> = None;
    loop {
        // Every whole request buffered, in order; a pending WAIT holds the rest back.
        let need = loop {
            let parsed =
                request::parse(&inbound.buf[inbound.start..]).map_err(|e| bad(e.to_string()))?;
            let (request, used) = match parsed {
                Parsed::Request { request, used } => (request, used),
                Parsed::Incomplete { need } => break inbound.start + need,
            };
            inbound.start += used;
            if !validated {
                if !matches!(request, Request::Validate { magic } if magic == wire::MAGIC) {
                    return Err(bad("client did not open with the TCPStore handshake".into()));
                }
                validated = true;
                continue;
            }
            if let Some((id, mut woken)) = pending.take() {
                if request != Request::CancelWait {
                    return Err(bad(format!("{request:?} while a WAIT is pending")));
                }
                shared.lock().cancel(id);
                if woken.try_recv().is_ok() {
                    out.push(wire::STOP_WAITING);
                }
                out.push(wire::WAIT_CANCELED);
                continue;
            }
            pending = handle(request, shared, &mut out).map_err(bad)?;
            if pending.is_some() {
                // Only a CANCEL_WAIT may follow; it is read when it comes.
                break inbound.buf.len() + 1;
            }
        };
        if !out.is_empty() {
            w.write_all(&out).await?;
            out.clear();
        }
        inbound.shrink();
        if !inbound.room(need) {
            tracing::warn!(
                "store server: dropped a connection whose request needs {need} bytes: the \
                 connections' buffers together reached the limit of {} bytes",
                limits.memory
            );
            return Err(bad("over the memory limit".into()));
        }
        // Before the handshake and inside a request, the client must keep sending.
        let partial = !validated || inbound.start < inbound.buf.len();
        let read = async {
            if partial {
                match tokio::time::timeout(limits.stall, r.read_buf(&mut inbound.buf)).await {
                    Ok(read) => read,
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no bytes for {:?} inside a request", limits.stall),
                    )),
                }
            } else {
                r.read_buf(&mut inbound.buf).await
            }
        };
        let read = match pending.as_mut() {
            Some((_, woken)) => tokio::select! {
                _ = woken => {
                    pending = None;
                    out.push(wire::STOP_WAITING);
                    continue;
                }
                read = read => read,
            },
            None => read.await,
        };
        if read? == 0 {
            return if inbound.start == inbound.buf.len() {
                Ok(())
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

/// Serves one request into `out`; a WAIT that must wait is returned pending.
fn handle(
    request: Request,
    shared: &Shared,
    out: &mut Vec<u8>,
) -> Result<Option<(u64, oneshot::Receiver<()>)>, String> {
    match request {
        Request::Validate { magic } => {
            if magic != wire::MAGIC {
                return Err("bad handshake magic".into());
            }
        }
        Request::Ping { nonce } => out.extend_from_slice(&nonce.to_le_bytes()),
        Request::Set { key, value } => shared.lock().set(key, value),
        Request::CompareSet {
            key,
            expected,
            desired,
        } => {
            let current = shared.lock().compare_set(key, expected, desired);
            wire::put_bytes(out, &current);
        }
        Request::Get { key } => {
            let state = shared.lock();
            wire::put_bytes(out, state.data.get(&key).map_or(&[][..], Vec::as_slice));
        }
        Request::Add { key, delta } => {
            let value = shared.lock().add(key, delta)?;
            out.extend_from_slice(&value.to_le_bytes());
        }
        Request::Check { keys } => {
            let state = shared.lock();
            let ready = keys.iter().all(|k| state.present(k));
            out.push(if ready {
                wire::CHECK_READY
            } else {
                wire::CHECK_NOT_READY
            });
        }
        Request::Wait { keys } => {
            let pending = shared.lock().wait(&keys);
            if pending.is_none() {
                out.push(wire::STOP_WAITING);
            }
            return Ok(pending);
        }
        Request::CancelWait => out.push(wire::WAIT_CANCELED),
        Request::NumKeys => out.extend_from_slice(&(shared.lock().data.len() as i64).to_le_bytes()),
        Request::DeleteKey { key } => {
            let deleted = i64::from(shared.lock().data.remove(&key).is_some());
            out.extend_from_slice(&deleted.to_le_bytes());
        }
        Request::Append { key, value } => {
            let mut state = shared.lock();
            state
                .data
                .entry(key.clone())
                .or_default()
                .extend_from_slice(&value);
            state.wake_all(&key);
        }
        Request::MultiGet { keys } => {
            let state = shared.lock();
            for key in keys {
                wire::put_bytes(out, state.data.get(&key).map_or(&[][..], Vec::as_slice));
            }
        }
        Request::MultiSet { pairs } => {
            let mut state = shared.lock();
            for (key, value) in pairs {
                state.set(key, value);
            }
        }
        Request::QueuePush { key, value } => {
            let mut state = shared.lock();
            state
                .queues
                .entry(key.clone())
                .or_default()
                .push_back(value);
            state.wake_one(&key);
        }
        Request::QueuePop { key } => {
            let mut state = shared.lock();
            let queue = state.queues.entry(key).or_default();
            out.extend_from_slice(&(queue.len() as i64).to_le_bytes());
            if let Some(value) = queue.pop_front() {
                wire::put_bytes(out, &value);
            }
        }
        Request::QueueLen { key } => {
            let len = shared.lock().queues.get(&key).map_or(0, VecDeque::len);
            out.extend_from_slice(&(len as i64).to_le_bytes());
        }
    }
    Ok(None)
}
