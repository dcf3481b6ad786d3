//! TCP between ranks: one connection per pair of ranks, bootstrapped through the store.
//!
//! Each message is a frame: a header (tag, length, the call it belongs to) and the payload. An exchange
//! drives its send and its receive together on non-blocking sockets with `poll`, so a ring
//! step never deadlocks on full socket buffers, and nothing waits past the deadline. Frames
//! from a peer that carry another tag than the one awaited are kept for their own receive.
//!
//! # Bootstrap
//! Every rank listens on an ephemeral port of the address its store connection uses (the
//! interface that reaches the master), publishes `addr/<rank>`, then connects to every lower
//! rank and accepts every higher one; a connection opens with the connecting rank's number.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::label::{accept, frame_header, parse_frame_header, Stash, FRAME_HEADER};
use super::{Label, Transport, TransportError};
use crate::store::{StoreClient, StoreError};

/// Why the mesh could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The store failed (addresses are exchanged through it).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A socket operation failed.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Link {
    stream: TcpStream,
    /// Frames already read whose tag no receive has asked for yet.
    early: Stash,
}

/// One rank's end of a TCP full mesh.
#[derive(Debug)]
pub struct TcpTransport {
    rank: usize,
    size: usize,
    /// `links[peer]`; `None` for this rank.
    links: Vec<Option<Mutex<Link>>>,
}

impl TcpTransport {
    /// Builds the mesh: publishes this rank's address under `store` and connects to every peer.
    ///
    /// # Errors
    /// [`BootstrapError`] naming the store or socket operation that failed.
    pub async fn connect(
        store: &mut StoreClient,
        rank: usize,
        size: usize,
        timeout: Duration,
    ) -> Result<Self, BootstrapError> {
        let io = |what: String| move |source| BootstrapError::Io { what, source };
        let ip = store
            .local_addr()
            .map_err(io("read the store connection's address".into()))?
            .ip();
        let listener = TcpListener::bind((ip, 0)).map_err(io(format!("listen on {ip}")))?;
        let addr = listener
            .local_addr()
            .map_err(io("read the listener's address".into()))?;
        store
            .set(&format!("addr/{rank}"), addr.to_string().as_bytes())
            .await?;
        let mut links: Vec<Option<Mutex<Link>>> = (0..size).map(|_| None).collect();
        for (peer, slot) in links.iter_mut().enumerate().take(rank) {
            let text =
                String::from_utf8_lossy(&store.get(&format!("addr/{peer}")).await?).into_owned();
            let peer_addr: SocketAddr = text.parse().map_err(|_| BootstrapError::Io {
                what: format!("parse rank {peer}'s address {text:?}"),
                source: ErrorKind::InvalidData.into(),
            })?;
            let mut stream = TcpStream::connect_timeout(&peer_addr, timeout)
                .map_err(io(format!("connect to rank {peer} at {peer_addr}")))?;
            stream
                .write_all(&(rank as u64).to_le_bytes())
                .map_err(io(format!("greet rank {peer}")))?;
            *slot = Some(Mutex::new(
                Link::new(stream).map_err(io(format!("set up the link to rank {peer}")))?,
            ));
        }
        for _ in rank + 1..size {
            let (mut stream, from) = accept_within(&listener, timeout)
                .map_err(io(format!("accept the ranks above {rank}")))?;
            let mut hello = [0u8; 8];
            stream
                .set_read_timeout(Some(timeout))
                .map_err(io("configure a link".into()))?;
            stream
                .read_exact(&mut hello)
                .map_err(io(format!("read the greeting from {from}")))?;
            let peer = u64::from_le_bytes(hello) as usize;
            if peer <= rank || peer >= size || links[peer].is_some() {
                return Err(BootstrapError::Io {
                    what: format!("accept {from}: it claims to be rank {peer}"),
                    source: ErrorKind::InvalidData.into(),
                });
            }
            links[peer] = Some(Mutex::new(
                Link::new(stream).map_err(io(format!("set up the link to rank {peer}")))?,
            ));
        }
        Ok(Self { rank, size, links })
    }

    fn link(&self, peer: usize) -> Result<MutexGuard<'_, Link>, TransportError> {
        let link = self
            .links
            .get(peer)
            .and_then(Option::as_ref)
            .ok_or(TransportError::Broken {
                peer,
                reason: "no such peer".into(),
            })?;
        Ok(link
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

fn accept_within(
    listener: &TcpListener,
    timeout: Duration,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, from)) => {
                stream.set_nonblocking(false)?;
                return Ok((stream, from));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(std::io::Error::new(
                        ErrorKind::TimedOut,
                        format!("no connection within {timeout:?}"),
                    ));
                }
                poll_one(listener.as_raw_fd(), libc::POLLIN, left)?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Socket buffer size asked for each link: large enough that a ring step's chunk moves in a
/// few system calls (the kernel's 16 KiB default lets ~4 KiB through per wake-up).
const SOCKET_BUFFER: libc::c_int = 4 << 20;

#[allow(unsafe_code)]
fn enlarge_buffers(stream: &TcpStream) {
    for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: a valid socket, a valid pointer to an int, and its size. The kernel caps the
        // value at net.core.[rw]mem_max; failure only leaves the default, so it is ignored.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&SOCKET_BUFFER).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

impl Link {
    fn new(stream: TcpStream) -> std::io::Result<Self> {
        enlarge_buffers(&stream);
        stream.set_nodelay(true)?;
        stream.set_read_timeout(None)?;
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            early: Stash::default(),
        })
    }
}

/// Waits until `fd` is ready for `events`, at most `left`.
#[allow(unsafe_code)]
fn poll_one(fd: i32, events: libc::c_short, left: Duration) -> std::io::Result<()> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    if unsafe { libc::poll(&mut p, 1, ms) } < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// The frame being read from a peer.
enum Current {
    /// A frame for the awaited tag: its payload goes straight into the receive buffer.
    Direct { filled: usize },
    /// A frame for another tag: kept until its own receive asks for it.
    Early {
        label: Label,
        buf: Vec<u8>,
        filled: usize,
    },
}

/// Progress of one receive: the frame header, then the payload.
struct Receiving<'a> {
    peer: usize,
    label: Label,
    out: &'a mut [u8],
    header: [u8; FRAME_HEADER],
    got_header: usize,
    current: Option<Current>,
    done: bool,
}

/// A read that made progress (`Some(n)`), had nothing to read (`None`), or failed.
fn read_into(
    stream: &mut TcpStream,
    peer: usize,
    buf: &mut [u8],
) -> Result<Option<usize>, TransportError> {
    loop {
        return match stream.read(buf) {
            Ok(0) if !buf.is_empty() => Err(TransportError::Broken {
                peer,
                reason: "connection closed (the process is gone)".into(),
            }),
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => Err(TcpTransport::fail(peer, &e)),
        };
    }
}

impl TcpTransport {
    fn fail(peer: usize, e: &std::io::Error) -> TransportError {
        TransportError::Broken {
            peer,
            reason: e.to_string(),
        }
    }

    /// Reads what is available; completes `r` when a frame with its tag is whole.
    fn read_some(link: &mut Link, r: &mut Receiving<'_>) -> Result<(), TransportError> {
        loop {
            if r.current.is_none() {
                if link.early.deliver(r.peer, &r.label, r.out)? {
                    r.done = true;
                    return Ok(());
                }
                let Some(n) = read_into(&mut link.stream, r.peer, &mut r.header[r.got_header..])?
                else {
                    return Ok(());
                };
                r.got_header += n;
                if r.got_header < FRAME_HEADER {
                    continue;
                }
                r.got_header = 0;
                let (theirs, len) = parse_frame_header(&r.header);
                r.current = Some(if accept(r.peer, &r.label, r.out.len(), &theirs, len)? {
                    Current::Direct { filled: 0 }
                } else {
                    Current::Early {
                        label: theirs,
                        buf: vec![0u8; len],
                        filled: 0,
                    }
                });
            }
            match r.current.as_mut() {
                Some(Current::Direct { filled }) => {
                    while *filled < r.out.len() {
                        let Some(n) = read_into(&mut link.stream, r.peer, &mut r.out[*filled..])?
                        else {
                            return Ok(());
                        };
                        *filled += n;
                    }
                    r.current = None;
                    r.done = true;
                    return Ok(());
                }
                Some(Current::Early { label, buf, filled }) => {
                    while *filled < buf.len() {
                        let Some(n) = read_into(&mut link.stream, r.peer, &mut buf[*filled..])?
                        else {
                            return Ok(());
                        };
                        *filled += n;
                    }
                    let (label, buf) = (*label, std::mem::take(buf));
                    link.early.keep(label, buf);
                    r.current = None;
                }
                None => {}
            }
        }
    }

    /// Writes what the socket takes of `header` then `payload`, from `written` on.
    fn write_some(
        link: &mut Link,
        peer: usize,
        header: &[u8; FRAME_HEADER],
        payload: &[u8],
        written: &mut usize,
    ) -> Result<(), TransportError> {
        let total = FRAME_HEADER + payload.len();
        while *written < total {
            let result = if *written < FRAME_HEADER {
                let parts = [IoSlice::new(&header[*written..]), IoSlice::new(payload)];
                link.stream.write_vectored(&parts)
            } else {
                link.stream.write(&payload[*written - FRAME_HEADER..])
            };
            match result {
                Ok(n) => *written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(Self::fail(peer, &e)),
            }
        }
        Ok(())
    }
}

impl Transport for TcpTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    #[allow(unsafe_code)]
    fn exchange(
        &self,
        label: Label,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        let until = Instant::now() + deadline;
        let (send_peer, payload) = send.map_or((None, &[][..]), |(p, b)| (Some(p), b));
        let header = frame_header(&label, payload.len());
        let mut written = 0usize;
        let total = FRAME_HEADER + payload.len();
        let mut receiving = recv.map(|(peer, out)| Receiving {
            peer,
            label,
            out,
            header: [0; FRAME_HEADER],
            got_header: 0,
            current: None,
            done: false,
        });
        // A send to and a receive from the same peer share its link: lock it once.
        let same = matches!((send_peer, &receiving), (Some(s), Some(r)) if s == r.peer);
        loop {
            if let Some(peer) = send_peer.filter(|_| written < total) {
                let mut link = self.link(peer)?;
                Self::write_some(&mut link, peer, &header, payload, &mut written)?;
                if same {
                    if let Some(r) = receiving.as_mut().filter(|r| !r.done) {
                        Self::read_some(&mut link, r)?;
                    }
                }
            }
            if let Some(r) = receiving
                .as_mut()
                .filter(|r| !(r.done || (same && written < total)))
            {
                let mut link = self.link(r.peer)?;
                Self::read_some(&mut link, r)?;
            }
            let send_done = send_peer.is_none() || written == total;
            let recv_done = receiving.as_ref().is_none_or(|r| r.done);
            if send_done && recv_done {
                return Ok(());
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let peer = if recv_done {
                    send_peer.unwrap_or(0)
                } else {
                    receiving.map_or(0, |r| r.peer)
                };
                return Err(TransportError::Timeout {
                    peer,
                    after: deadline,
                });
            }
            let mut fds = Vec::with_capacity(2);
            if let (false, Some(peer)) = (send_done, send_peer) {
                fds.push(libc::pollfd {
                    fd: self.link(peer)?.stream.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                });
            }
            if let (false, Some(r)) = (recv_done, receiving.as_ref()) {
                fds.push(libc::pollfd {
                    fd: self.link(r.peer)?.stream.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: `fds` is a valid array of pollfd for its length during the call.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        }
    }
}
