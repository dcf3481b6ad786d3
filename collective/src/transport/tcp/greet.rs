//! The mesh's greetings: a connecting rank opens with [`GREETING_MAGIC`], the listener's
//! secret (from the store) and its rank. The listener greets every connection at once,
//! without waiting on any one of them, so a stray or silent connection neither fails the job
//! nor holds up the ranks queued behind it; it is dropped after [`GREETING_WITHIN`].

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Bytes of a greeting: magic, secret, rank.
pub(super) const GREETING: usize = 8 + 16 + 8;
/// What every greeting starts with.
pub(super) const GREETING_MAGIC: &[u8; 8] = b"ferrun\x00\x01";
/// How long one connection may take to greet before it is dropped (the mesh waits on).
const GREETING_WITHIN: Duration = Duration::from_secs(5);

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `"<addr> <32 hex digits>"` as a rank published it.
pub(super) fn parse_published(value: &[u8]) -> Option<(SocketAddr, [u8; 16])> {
    let text = std::str::from_utf8(value).ok()?;
    let (addr, secret) = text.split_once(' ')?;
    let mut out = [0u8; 16];
    if secret.len() != 32 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(secret.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some((addr.parse().ok()?, out))
}

/// A connection that has not finished its greeting.
struct Pending {
    stream: TcpStream,
    from: SocketAddr,
    hello: [u8; GREETING],
    got: usize,
    until: Instant,
}

/// What becomes of a pending connection.
enum Verdict {
    /// Its greeting is not whole yet.
    Wait,
    /// It is this rank.
    Link(usize),
    /// It is not a rank of this job, for this reason.
    Drop(String),
}

/// What a whole greeting claims: a rank, if it carries the secret.
fn claimed(hello: &[u8; GREETING], secret: &[u8; 16]) -> Result<usize, &'static str> {
    if &hello[..8] != GREETING_MAGIC || hello[8..24] != secret[..] {
        return Err("its greeting lacks this job's secret");
    }
    let mut rank = [0u8; 8];
    rank.copy_from_slice(&hello[24..]);
    usize::try_from(u64::from_le_bytes(rank)).map_err(|_| "rank out of range")
}

/// Accepts the ranks above `rank` (of `size`), each once, within `timeout`; the streams by
/// rank, blocking again.
pub(super) fn accept_ranks(
    listener: &TcpListener,
    rank: usize,
    size: usize,
    secret: &[u8; 16],
    timeout: Duration,
) -> std::io::Result<Vec<(usize, TcpStream)>> {
    listener.set_nonblocking(true)?;
    let until = Instant::now() + timeout;
    let mut pending: Vec<Pending> = Vec::new();
    let mut linked: Vec<(usize, TcpStream)> = Vec::new();
    while linked.len() < size - rank - 1 {
        loop {
            match listener.accept() {
                Ok((stream, from)) => {
                    stream.set_nonblocking(true)?;
                    pending.push(Pending {
                        stream,
                        from,
                        hello: [0; GREETING],
                        got: 0,
                        until: (Instant::now() + GREETING_WITHIN).min(until),
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // The client gave up before it was accepted.
                Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
                Err(e) => return Err(e),
            }
        }
        let mut i = 0;
        while i < pending.len() {
            let taken = |peer: usize| linked.iter().any(|(r, _)| *r == peer);
            let p = &mut pending[i];
            let verdict = match p.stream.read(&mut p.hello[p.got..]) {
                Ok(0) => Verdict::Drop("it closed before greeting".into()),
                Ok(n) => {
                    p.got += n;
                    if p.got < GREETING {
                        Verdict::Wait
                    } else {
                        match claimed(&p.hello, secret) {
                            Ok(peer) if peer > rank && peer < size && !taken(peer) => Verdict::Link(peer),
                            Ok(peer) => Verdict::Drop(format!(
                                "it claims rank {peer}: not a rank this one accepts (ranks above {rank} of {size}, once each)"
                            )),
                            Err(why) => Verdict::Drop(why.into()),
                        }
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    if Instant::now() >= p.until {
                        Verdict::Drop(format!("it did not greet within {GREETING_WITHIN:?}"))
                    } else {
                        Verdict::Wait
                    }
                }
                Err(e) => Verdict::Drop(e.to_string()),
            };
            match verdict {
                Verdict::Wait => i += 1,
                Verdict::Link(peer) => {
                    let p = pending.swap_remove(i);
                    p.stream.set_nonblocking(false)?;
                    linked.push((peer, p.stream));
                }
                Verdict::Drop(why) => {
                    let p = pending.swap_remove(i);
                    tracing::warn!(
                        "dropped a connection from {} that is not a rank of this job: {why}",
                        p.from
                    );
                }
            }
        }
        if linked.len() == size - rank - 1 {
            break;
        }
        let now = Instant::now();
        if now >= until {
            let missing: Vec<usize> = (rank + 1..size)
                .filter(|p| !linked.iter().any(|(r, _)| r == p))
                .collect();
            return Err(std::io::Error::new(
                ErrorKind::TimedOut,
                format!("ranks {missing:?} did not connect within {timeout:?}"),
            ));
        }
        let next = pending.iter().map(|p| p.until).fold(until, Instant::min);
        wait(listener, &pending, next.saturating_duration_since(now));
    }
    Ok(linked)
}

/// Waits until the listener or a pending connection is readable, at most `left`.
#[allow(unsafe_code)]
fn wait(listener: &TcpListener, pending: &[Pending], left: Duration) {
    let mut fds: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
        .chain(pending.iter().map(|p| p.stream.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid array of pollfd for its length during the call.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
}
