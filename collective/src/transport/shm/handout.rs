//! Handing segments to the other ranks of a host: each rank listens on an abstract Unix socket
//! named by a random secret that it publishes in the store; a peer connects, says its rank,
//! and receives the segment's file descriptor (`SCM_RIGHTS`). No segment ever has a name in a
//! file system, so nothing is left behind by a rank killed at any point, and no store value
//! can make a rank open a file.
//!
//! # Trust
//! The store is trusted to name the socket. Whoever connects must run as this user
//! (`SO_PEERCRED`) and claim a rank of the group not served yet; anything else is dropped and
//! the handout waits on. A received descriptor is checked by [`super::segment::Segment::adopt`].

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};

const PREFIX: &str = "ferrun-shm-";
/// How long one connection may take to say its rank before it is dropped.
const HELLO_WITHIN: Duration = Duration::from_secs(5);

/// This rank's listening socket.
#[derive(Debug)]
pub(super) struct Handout {
    listener: UnixListener,
    name: String,
}

/// Whether `name` is one that [`Handout::listen`] makes.
pub(super) fn valid_name(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .is_some_and(|s| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn abstract_addr(name: &str) -> std::io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(name.as_bytes())
}

impl Handout {
    /// Listens on a fresh abstract name.
    pub(super) fn listen() -> std::io::Result<Self> {
        let secret = crate::transport::random_secret()?;
        let name = format!(
            "{PREFIX}{}",
            secret
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let listener = UnixListener::bind_addr(&abstract_addr(&name)?)?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener, name })
    }

    /// The name peers connect to.
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Hands `fd` to each of `peers` (job ranks) once; `me` is this rank.
    pub(super) fn serve(
        &self,
        fd: BorrowedFd<'_>,
        me: usize,
        peers: &[usize],
        until: Instant,
    ) -> Result<(), String> {
        let mut served = vec![false; peers.len()];
        while served.contains(&false) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing: Vec<usize> = (0..peers.len())
                    .filter(|&i| !served[i])
                    .map(|i| peers[i])
                    .collect();
                return Err(format!(
                    "ranks {missing:?} did not ask for this rank's segment in time"
                ));
            }
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    wait_readable(self.listener.as_raw_fd(), left);
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("cannot accept on {}: {e}", self.name)),
            };
            match hello(&stream, left.min(HELLO_WITHIN)) {
                Ok(rank) => match peers.iter().position(|&p| p == rank) {
                    Some(i) if !served[i] => {
                        let fds = [fd.as_raw_fd()];
                        sendmsg::<()>(
                            stream.as_raw_fd(),
                            &[IoSlice::new(&(me as u64).to_le_bytes())],
                            &[ControlMessage::ScmRights(&fds)],
                            MsgFlags::MSG_NOSIGNAL,
                            None,
                        )
                        .map_err(|e| format!("cannot hand the segment to rank {rank}: {e}"))?;
                        served[i] = true;
                    }
                    _ => tracing::warn!(
                        "shared memory: dropped a connection claiming rank {rank}: not a peer \
                         waiting for this rank's segment"
                    ),
                },
                Err(e) => tracing::warn!("shared memory: dropped a connection: {e}"),
            }
        }
        Ok(())
    }
}

/// Reads the rank a connection claims, after checking that it runs as this user.
fn hello(stream: &UnixStream, within: Duration) -> Result<usize, String> {
    let cred = getsockopt(stream, sockopt::PeerCredentials)
        .map_err(|e| format!("cannot read its credentials: {e}"))?;
    if cred.uid() != nix::unistd::geteuid().as_raw() {
        return Err(format!("it runs as user {}, not this one", cred.uid()));
    }
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(within.max(Duration::from_millis(1)))))
        .map_err(|e| e.to_string())?;
    let mut rank = [0u8; 8];
    (&*stream)
        .read_exact(&mut rank)
        .map_err(|e| format!("it said no rank: {e}"))?;
    usize::try_from(u64::from_le_bytes(rank)).map_err(|_| "rank out of range".into())
}

/// Connects to the handout `name` and says `me`: the connection to [`receive`] on.
pub(super) fn ask(name: &str, me: usize) -> std::io::Result<UnixStream> {
    let mut stream = UnixStream::connect_addr(&abstract_addr(name)?)?;
    stream.write_all(&(me as u64).to_le_bytes())?;
    Ok(stream)
}

/// Receives `peer`'s segment on a connection made by [`ask`].
#[allow(unsafe_code)]
pub(super) fn receive(stream: &UnixStream, peer: usize, until: Instant) -> Result<OwnedFd, String> {
    let left = until.saturating_duration_since(Instant::now());
    stream
        .set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .map_err(|e| e.to_string())?;
    let mut said = [0u8; 8];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let (bytes, fds) = {
        let mut iov = [IoSliceMut::new(&mut said)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| format!("no segment came: {e}"))?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(|e| e.to_string())? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                fds.extend(received);
            }
        }
        (msg.bytes, fds)
    };
    // SAFETY: the kernel just installed these descriptors in this process; each is owned once.
    let mut fds: Vec<OwnedFd> = fds
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if bytes != 8 || u64::from_le_bytes(said) != peer as u64 || fds.len() != 1 {
        return Err(format!(
            "its answer is not a segment handout ({bytes} bytes, {} descriptors)",
            fds.len()
        ));
    }
    fds.pop().ok_or_else(|| "no descriptor".into())
}

#[allow(unsafe_code)]
fn wait_readable(fd: RawFd, left: Duration) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = left.as_millis().clamp(1, 100) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) };
}
