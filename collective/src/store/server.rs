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
//! # Caveats
//! A connection that breaks the protocol (bad magic, unknown opcode, oversized field) is
//! dropped, as torch's server does; the others are unaffected.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncReadExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::wire::{self, Op};
use super::StoreError;

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

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
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
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = oneshot::channel();
        let serving = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("ferrun-store".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match runtime {
                    Ok(rt) => rt.block_on(serve(listener, serving, stopped)),
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

async fn serve(listener: StdListener, shared: Arc<Shared>, mut stopped: oneshot::Receiver<()>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return tracing::error!("store server cannot listen: {e}"),
    };
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        if let Err(e) = connection(stream, &shared).await {
                            tracing::debug!("store connection from {peer} closed: {e}");
                        }
                    });
                }
                Err(e) => tracing::warn!("store server accept failed: {e}"),
            },
        }
    }
}

async fn connection(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let (r, w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut w = BufWriter::new(w);
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    if r.read_u8().await? != Op::Validate as u8 || r.read_u32_le().await? != wire::MAGIC {
        return Err(bad("client did not open with the TCPStore handshake".into()));
    }
    let mut out = Vec::with_capacity(256);
    loop {
        let byte = match r.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let op = Op::from_byte(byte).ok_or_else(|| bad(format!("unknown opcode {byte}")))?;
        out.clear();
        match op {
            Op::Validate => {
                if r.read_u32_le().await? != wire::MAGIC {
                    return Err(bad("bad handshake magic".into()));
                }
            }
            Op::Ping => out.extend_from_slice(&r.read_u32_le().await?.to_le_bytes()),
            Op::Set => {
                let key = wire::read_key(&mut r).await?;
                let value = wire::read_bytes(&mut r, wire::MAX_VALUE_LEN).await?;
                shared.lock().set(key, value);
            }
            Op::CompareSet => {
                let key = wire::read_key(&mut r).await?;
                let expected = wire::read_bytes(&mut r, wire::MAX_VALUE_LEN).await?;
                let desired = wire::read_bytes(&mut r, wire::MAX_VALUE_LEN).await?;
                let current = shared.lock().compare_set(key, expected, desired);
                wire::put_bytes(&mut out, &current);
            }
            Op::Get => {
                let key = wire::read_key(&mut r).await?;
                let state = shared.lock();
                wire::put_bytes(
                    &mut out,
                    state.data.get(&key).map_or(&[][..], Vec::as_slice),
                );
            }
            Op::Add => {
                let key = wire::read_key(&mut r).await?;
                let delta = r.read_i64_le().await?;
                let value = shared.lock().add(key, delta).map_err(bad)?;
                out.extend_from_slice(&value.to_le_bytes());
            }
            Op::Check => {
                let keys = wire::read_keys(&mut r).await?;
                let state = shared.lock();
                let ready = keys.iter().all(|k| state.present(k));
                out.push(if ready {
                    wire::CHECK_READY
                } else {
                    wire::CHECK_NOT_READY
                });
            }
            Op::Wait => {
                let keys = wire::read_keys(&mut r).await?;
                let pending = shared.lock().wait(&keys);
                match pending {
                    None => out.push(wire::STOP_WAITING),
                    Some((id, woken)) => {
                        wait_or_cancel(&mut r, &mut out, shared, id, woken).await?
                    }
                }
            }
            Op::CancelWait => out.push(wire::WAIT_CANCELED),
            Op::NumKeys => out.extend_from_slice(&(shared.lock().data.len() as i64).to_le_bytes()),
            Op::DeleteKey => {
                let key = wire::read_key(&mut r).await?;
                let deleted = i64::from(shared.lock().data.remove(&key).is_some());
                out.extend_from_slice(&deleted.to_le_bytes());
            }
            Op::Append => {
                let key = wire::read_key(&mut r).await?;
                let value = wire::read_bytes(&mut r, wire::MAX_VALUE_LEN).await?;
                let mut state = shared.lock();
                state
                    .data
                    .entry(key.clone())
                    .or_default()
                    .extend_from_slice(&value);
                state.wake_all(&key);
            }
            Op::MultiGet => {
                let keys = wire::read_keys(&mut r).await?;
                let state = shared.lock();
                for key in keys {
                    wire::put_bytes(
                        &mut out,
                        state.data.get(&key).map_or(&[][..], Vec::as_slice),
                    );
                }
            }
            Op::MultiSet => {
                let count = r.read_u64_le().await?;
                if count > wire::MAX_KEY_COUNT {
                    return Err(bad(format!("{count} keys in one MULTI_SET")));
                }
                let mut pairs = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    pairs.push((
                        wire::read_key(&mut r).await?,
                        wire::read_bytes(&mut r, wire::MAX_VALUE_LEN).await?,
                    ));
                }
                let mut state = shared.lock();
                for (key, value) in pairs {
                    state.set(key, value);
                }
            }
            Op::QueuePush => {
                let key = wire::read_key(&mut r).await?;
                let value = wire::read_bytes(&mut r, wire::MAX_VALUE_LEN).await?;
                let mut state = shared.lock();
                state
                    .queues
                    .entry(key.clone())
                    .or_default()
                    .push_back(value);
                state.wake_one(&key);
            }
            Op::QueuePop => {
                let key = wire::read_key(&mut r).await?;
                let mut state = shared.lock();
                let queue = state.queues.entry(key).or_default();
                out.extend_from_slice(&(queue.len() as i64).to_le_bytes());
                if let Some(value) = queue.pop_front() {
                    wire::put_bytes(&mut out, &value);
                }
            }
            Op::QueueLen => {
                let key = wire::read_key(&mut r).await?;
                let len = shared.lock().queues.get(&key).map_or(0, VecDeque::len);
                out.extend_from_slice(&(len as i64).to_le_bytes());
            }
        }
        if !out.is_empty() {
            wire::send(&mut w, &out).await?;
        }
    }
}

/// A pending `WAIT`: answer `STOP_WAITING` when the keys arrive, or `WAIT_CANCELED` when the
/// client gives up first (then `STOP_WAITING` too if both happened, which torch's client
/// expects and skips).
async fn wait_or_cancel(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    out: &mut Vec<u8>,
    shared: &Shared,
    id: u64,
    mut woken: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    tokio::select! {
        _ = &mut woken => out.push(wire::STOP_WAITING),
        // A single-byte read is cancel safe: it completes or consumes nothing.
        next = r.read_u8() => {
            shared.lock().cancel(id);
            let next = next?;
            if next != Op::CancelWait as u8 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("opcode {next} while a WAIT is pending"),
                ));
            }
            if woken.try_recv().is_ok() {
                out.push(wire::STOP_WAITING);
            }
            out.push(wire::WAIT_CANCELED);
        }
    }
    Ok(())
}
