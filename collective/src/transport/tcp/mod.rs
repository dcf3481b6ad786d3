//! TCP between ranks: one connection per pair of ranks, bootstrapped through the store.
//!
//! Each message is a frame: a header (tag, length, the call it belongs to) and the payload. An exchange
//! drives its send and its receive together on non-blocking sockets with `poll`, so a ring
//! step never deadlocks on full socket buffers, and nothing waits past the deadline. Frames
//! from a peer that carry another tag than the one awaited are kept for their own receive.
//!
//! # Bootstrap
//! Every rank listens on an ephemeral port of the address its store connection uses (the
//! interface that reaches the master), publishes `addr/<rank>` with a random secret, then
//! connects to every lower rank and accepts every higher one; a connection opens with a
//! greeting that carries the listener's secret and the connecting rank's number.
//!
//! # Trust
//! The store is trusted (it is the job's root of trust: whoever can write it can point ranks
//! anywhere). Peers are not: a connection without the secret is dropped without failing the
//! job, frame lengths are checked before anything is allocated (see [`super::frame`]), and a
//! peer that breaks the framing breaks only its own link, named in the error.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

mod greet;

use greet::{hex, parse_published, GREETING, GREETING_MAGIC};

use super::frame::{Inbox, Receive, Send, Source, Target};
use super::{Envelope, Screen, Transport, TransportError};
use crate::store::{KeyValue, StoreError};

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
    inbox: Inbox,
    /// Why no frame can be sent on it any more (an earlier one stopped halfway).
    unsendable: Option<String>,
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
    /// Builds the mesh: publishes this rank's address and a secret under `store` and connects
    /// to every peer. A connection that does not greet with the secret (a port scan, a stray or
    /// foreign process) is dropped and the mesh waits on for the ranks of this job.
    ///
    /// # Errors
    /// [`BootstrapError`] naming the store or socket operation that failed.
    pub async fn connect(
        store: &mut impl KeyValue,
        rank: usize,
        size: usize,
        timeout: Duration,
    ) -> Result<Self, BootstrapError> {
        let io = |what: String| move |source| BootstrapError::Io { what, source };
        let ip = store
            .local_ip()
            .map_err(io("find the local address that reaches the store".into()))?;
        let listener = TcpListener::bind((ip, 0)).map_err(io(format!("listen on {ip}")))?;
        crate::net::deepen_backlog(&listener);
        let addr = listener
            .local_addr()
            .map_err(io("read the listener's address".into()))?;
        let secret = super::random_secret().map_err(io("read /dev/urandom".into()))?;
        store
            .set(
                &format!("addr/{rank}"),
                format!("{addr} {}", hex(&secret)).as_bytes(),
            )
            .await?;
        let mut links: Vec<Option<Mutex<Link>>> = (0..size).map(|_| None).collect();
        for (peer, slot) in links.iter_mut().enumerate().take(rank) {
            let published = store.get(&format!("addr/{peer}")).await?;
            let (peer_addr, peer_secret) =
                parse_published(&published).ok_or_else(|| BootstrapError::Io {
                    what: format!(
                        "parse rank {peer}'s address {:?} from the store",
                        String::from_utf8_lossy(&published)
                    ),
                    source: ErrorKind::InvalidData.into(),
                })?;
            let mut stream = TcpStream::connect_timeout(&peer_addr, timeout)
                .map_err(io(format!("connect to rank {peer} at {peer_addr}")))?;
            let mut hello = [0u8; GREETING];
            hello[..8].copy_from_slice(GREETING_MAGIC);
            hello[8..24].copy_from_slice(&peer_secret);
            hello[24..].copy_from_slice(&(rank as u64).to_le_bytes());
            stream
                .write_all(&hello)
                .map_err(io(format!("greet rank {peer}")))?;
            *slot = Some(Mutex::new(
                Link::new(stream).map_err(io(format!("set up the link to rank {peer}")))?,
            ));
        }
        for (peer, stream) in greet::accept_ranks(&listener, rank, size, &secret, timeout)
            .map_err(io(format!("accept the ranks above {rank} (of {size})")))?
        {
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
            inbox: Inbox::default(),
            unsendable: None,
        })
    }
}

/// A socket read without waiting: what has arrived, 0 when nothing has.
struct Socket<'a> {
    stream: &'a mut TcpStream,
    peer: usize,
}

impl Source for Socket<'_> {
    fn read(&mut self, out: &mut [u8]) -> Result<usize, TransportError> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            return match self.stream.read(out) {
                Ok(0) => Err(TransportError::Broken {
                    peer: self.peer,
                    reason: "connection closed (the process is gone)".into(),
                }),
                Ok(n) => Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(0),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => Err(TcpTransport::fail(self.peer, &e)),
            };
        }
    }
}

impl TcpTransport {
    fn fail(peer: usize, e: &std::io::Error) -> TransportError {
        TransportError::Broken {
            peer,
            reason: e.to_string(),
        }
    }

    /// Writes what the socket takes of the frame.
    fn write_some(link: &mut Link, s: &mut Send<'_>) -> Result<(), TransportError> {
        if let Some(reason) = &link.unsendable {
            return Err(TransportError::Broken {
                peer: s.peer,
                reason: reason.clone(),
            });
        }
        while !s.done() {
            let [a, b] = s.rest();
            let result = if a.is_empty() {
                link.stream.write(b)
            } else {
                link.stream
                    .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
            };
            match result {
                Ok(n) => s.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(Self::fail(s.peer, &e)),
            }
        }
        Ok(())
    }

    fn read_some(link: &mut Link, r: &mut Receive<'_, '_>) -> Result<(), TransportError> {
        let Link { stream, inbox, .. } = link;
        let mut socket = Socket {
            stream,
            peer: r.peer,
        };
        r.poll(&mut socket, inbox).map(drop)
    }
}

impl Transport for TcpTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn exchange(
        &self,
        envelope: &Envelope,
        screen: Screen<'_>,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        let mut sending = send.map(|(peer, payload)| Send::new(peer, envelope, payload));
        let mut receiving =
            recv.map(|(peer, out)| Receive::new(peer, envelope.tag, screen, Target::Buffer(out)));
        let result = self.drive(&mut sending, &mut receiving, deadline);
        // A frame given up halfway leaves its stream unusable: say so to whoever uses it next.
        if let Some(s) = sending.filter(|s| s.mid_frame()) {
            if let Ok(mut link) = self.link(s.peer) {
                link.unsendable.get_or_insert_with(|| {
                    format!("an earlier send to rank {} stopped inside a frame; rebuild the communicator", s.peer)
                });
            }
        }
        if let Some(r) = receiving {
            if let Ok(mut link) = self.link(r.peer) {
                r.end(&mut link.inbox);
            }
        }
        result
    }
}

impl TcpTransport {
    /// Moves both halves of an exchange until both are done or the deadline passes.
    #[allow(unsafe_code)]
    fn drive(
        &self,
        sending: &mut Option<Send<'_>>,
        receiving: &mut Option<Receive<'_, '_>>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        let until = Instant::now() + deadline;
        // A send to and a receive from the same peer share its link: lock it once.
        let same = matches!((&*sending, &*receiving), (Some(s), Some(r)) if s.peer == r.peer);
        loop {
            if let Some(s) = sending.as_mut().filter(|s| !s.done()) {
                let mut link = self.link(s.peer)?;
                let sent = Self::write_some(&mut link, s);
                if same {
                    if let Some(r) = receiving.as_mut().filter(|r| !r.done()) {
                        // What the peer sent before the link broke may say why it went.
                        Self::read_some(&mut link, r)?;
                    }
                }
                sent?;
            }
            let send_done = sending.as_ref().is_none_or(Send::done);
            if let Some(r) = receiving
                .as_mut()
                .filter(|r| !(r.done() || (same && !send_done)))
            {
                let mut link = self.link(r.peer)?;
                Self::read_some(&mut link, r)?;
            }
            let recv_done = receiving.as_ref().is_none_or(Receive::done);
            if send_done && recv_done {
                return Ok(());
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let awaited = receiving.as_ref().filter(|r| !r.done()).map(|r| r.peer);
                let feeding = sending.as_ref().filter(|s| !s.done()).map(|s| s.peer);
                let peer = awaited.or(feeding);
                debug_assert!(peer.is_some(), "an unfinished exchange has a peer");
                return Err(TransportError::Timeout {
                    peer: peer.unwrap_or(self.rank),
                    after: deadline,
                });
            }
            let mut fds = Vec::with_capacity(2);
            if let Some(s) = sending.as_ref().filter(|s| !s.done()) {
                fds.push(libc::pollfd {
                    fd: self.link(s.peer)?.stream.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                });
            }
            if let Some(r) = receiving.as_ref().filter(|r| !r.done()) {
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
