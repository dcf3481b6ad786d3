//! One client's connection: bytes in, whole requests parsed ([`super::super::request`]),
//! answers out, its buffer counted against the server's memory budget.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::super::request::{self, Parsed, Request};
use super::super::wire;
use super::{Limits, Shared};

/// TCP keepalive on a connection, so that the idle connection of a client whose host vanished
/// is closed by the kernel in the end rather than held forever.
#[allow(unsafe_code)]
pub(super) fn keepalive(stream: &TcpStream) -> std::io::Result<()> {
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
pub(super) struct Budget {
    pub(super) used: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub(super) fn new(limit: usize) -> Self {
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

pub(super) async fn connection(
    stream: TcpStream,
    shared: &Shared,
    limits: &Limits,
) -> std::io::Result<()> {
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
