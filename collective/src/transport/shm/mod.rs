//! Shared memory between the ranks of one host.
//!
//! Every rank owns a segment holding a doorbell and one inbound ring per peer. A sender copies
//! frames ([`super::frame`]) into its ring in the receiver's segment; a receiver copies them
//! out straight into the typed buffer, or reduces them straight from the ring
//! (`Transport::exchange_fold`). Progress is announced by bumping the other side's doorbell, a
//! futex word: a rank with nothing to do sleeps on its own doorbell, so waiting ranks leave
//! the cores to the working ones.
//!
//! # Guarantees
//! - Segments are anonymous memory files handed to peers over Unix sockets ([`handout`]):
//!   nothing is ever named in `/dev/shm`, so nothing is left behind by a rank killed at any
//!   point, and the kernel frees a segment with its last map.
//! - A peer's liveness is its lock on its segment, which the kernel drops when the process is
//!   gone — valid across PID namespaces (containers of one pod), unlike a pid.
//! - Every wait is bounded by the exchange's deadline.
//!
//! # Trust
//! Peers share this rank's memory, so a peer can write anything into it; nothing it writes is
//! trusted. Each side keeps its own counters and checks the other's on every read — the
//! producer's head may only grow, by at most the free space; the consumer's tail may only grow,
//! up to the head — and frame lengths are checked before use ([`super::frame`]). A violation is
//! a broken link naming the peer, never an access outside the ring. What a hostile peer can
//! still do is send wrong data, as it could over any transport.
//!
//! # Caveats
//! A process that forks (a data-loader worker) hands its segment lock to the child too: its
//! death is then noticed when the child exits, or at the deadline.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::frame::{Receive, Send, Target};
use super::{Envelope, Fold, Screen, Transport, TransportError};
use crate::store::{KeyValue, StoreError};

mod handout;
mod ring;
mod segment;

use ring::{corrupt, Inbound, Outbound, RingIn};
use segment::Segment;

/// Bytes of each inbound ring (a power of two).
const RING: usize = 1 << 20;
/// Ring control block: producer and consumer counters on cache lines of their own.
const CONTROL: usize = 128;
/// Doorbell area at the start of a segment.
const BELL: usize = 64;
/// Spins on the rings before sleeping on the doorbell (cheap for short waits).
const SPINS: u32 = 200;

/// Why the segments could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The store failed (segment handouts are found through it).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file, socket or mapping operation failed.
    #[error("shared memory: cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A peer's handout failed or was not a segment.
    #[error("shared memory: rank {peer}: {reason}; ranks that cannot share memory can use TCP (FERRUN_TRANSPORT=tcp)")]
    Peer {
        /// The peer.
        peer: usize,
        /// Why.
        reason: String,
    },
}

fn segment_len(size: usize) -> usize {
    BELL + size * (CONTROL + RING)
}

fn ring_base(from: usize) -> usize {
    BELL + from * (CONTROL + RING)
}

#[allow(unsafe_code)]
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: a valid futex word in shared memory (hence no FUTEX_PRIVATE_FLAG) and a valid
    // timespec; a spurious or early return is handled by the caller's loop.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

#[allow(unsafe_code)]
fn ring_bell(word: &AtomicU32) {
    word.fetch_add(1, Ordering::Release);
    // SAFETY: a valid futex word; wakes every waiter.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

/// One rank's end of the shared-memory mesh of a host.
#[derive(Debug)]
pub struct ShmTransport {
    /// This rank's index in `members`.
    rank: usize,
    /// The transport (job) ranks of the group, in order; peers are named by these.
    members: Vec<usize>,
    /// `segments[r]`: rank r's segment (its doorbell and inbound rings).
    segments: Vec<Segment>,
    inbound: Vec<Mutex<Inbound>>,
    outbound: Vec<Mutex<Outbound>>,
    /// More ranks share this host's memory than there are cores for them.
    oversubscribed: bool,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ShmTransport {
    /// Creates this rank's segment and maps every peer's (handouts found under `store`).
    /// Every rank of the job is in the group.
    ///
    /// # Errors
    /// [`ShmError`] naming the store, peer or operation that failed.
    pub async fn connect(
        store: &mut impl KeyValue,
        rank: usize,
        size: usize,
        timeout: Duration,
    ) -> Result<Self, ShmError> {
        Self::connect_group(store, (0..size).collect(), rank, timeout).await
    }

    /// As [`ShmTransport::connect`], for the job ranks `members` (those on this host); `me` is
    /// this rank's job rank.
    ///
    /// # Errors
    /// As [`ShmTransport::connect`].
    pub async fn connect_group(
        store: &mut impl KeyValue,
        members: Vec<usize>,
        me: usize,
        timeout: Duration,
    ) -> Result<Self, ShmError> {
        let size = members.len();
        let Some(rank) = members.iter().position(|&m| m == me) else {
            return Err(ShmError::Peer {
                peer: me,
                reason: format!("this rank is not in the group {members:?}"),
            });
        };
        let io = |what: String| move |source| ShmError::Io { what, source };
        let until = Instant::now() + timeout;
        let len = segment_len(size);
        let own = Segment::create(len).map_err(io(format!(
            "create a segment of {len} bytes (is memory short?)"
        )))?;
        let handout = handout::Handout::listen().map_err(io("listen for peers".into()))?;
        store
            .set(&format!("shm/{me}"), handout.name().as_bytes())
            .await?;
        let peers: Vec<usize> = members.iter().copied().filter(|&m| m != me).collect();
        // Ask every peer first (their sockets queue the asks), then serve, then collect:
        // no rank waits on another's order.
        let mut asked = Vec::with_capacity(peers.len());
        for &peer in &peers {
            let name = String::from_utf8(store.get(&format!("shm/{peer}")).await?)
                .ok()
                .filter(|n| handout::valid_name(n))
                .ok_or_else(|| ShmError::Peer {
                    peer,
                    reason: "the store holds no valid segment handout for it".into(),
                })?;
            asked.push(handout::ask(&name, me).map_err(|e| ShmError::Peer {
                peer,
                reason: format!(
                    "cannot reach its handout socket: {e} (another network namespace?)"
                ),
            })?);
        }
        handout
            .serve(own.fd(), me, &peers, until)
            .map_err(|reason| ShmError::Peer { peer: me, reason })?;
        let mut segments = Vec::with_capacity(size);
        let mut own = Some(own);
        let mut asked = asked.into_iter();
        for &member in &members {
            if member == me {
                segments.extend(own.take());
                continue;
            }
            let stream = asked.next().ok_or_else(|| ShmError::Peer {
                peer: member,
                reason: "no connection to it".into(),
            })?;
            let fail = |reason| ShmError::Peer {
                peer: member,
                reason,
            };
            let fd = handout::receive(&stream, member, until).map_err(fail)?;
            segments.push(Segment::adopt(fd, len).map_err(fail)?);
        }
        Ok(Self {
            rank,
            members,
            segments,
            inbound: (0..size).map(|_| Mutex::default()).collect(),
            outbound: (0..size).map(|_| Mutex::default()).collect(),
            oversubscribed: std::thread::available_parallelism().map_or(true, |c| size > c.get()),
        })
    }

    /// Reads what the ring from the receive's peer holds, without waiting.
    fn pull(&self, r: &mut Receive<'_, '_>) -> Result<bool, TransportError> {
        let mut at = locked(&self.inbound[r.peer]);
        let Inbound {
            inbox,
            tail,
            seen_head,
        } = &mut *at;
        let mut ring = RingIn {
            segment: &self.segments[self.rank],
            ring: ring_base(r.peer),
            tail,
            seen_head,
            peer: r.peer,
        };
        let moved = r.poll(&mut ring, inbox);
        if matches!(moved, Ok(true)) {
            // The producer may be waiting for room.
            ring_bell(self.segments[r.peer].bell());
        }
        moved
    }

    /// Writes as much of the frame as the ring has room for; whether anything moved.
    fn push(&self, s: &mut Send<'_>) -> Result<bool, TransportError> {
        let mut at = locked(&self.outbound[s.peer]);
        if let Some(reason) = &at.unsendable {
            return Err(TransportError::Broken {
                peer: s.peer,
                reason: reason.clone(),
            });
        }
        let segment = &self.segments[s.peer];
        let ring = ring_base(self.rank);
        let tail = segment.word(ring + 64).load(Ordering::Acquire);
        if tail < at.seen_tail || tail > at.head || at.head - tail > RING as u64 {
            return Err(corrupt(
                s.peer,
                format!("tail {tail} after {}, head {}", at.seen_tail, at.head),
            ));
        }
        at.seen_tail = tail;
        let room = RING - (at.head - tail) as usize;
        let mut moved = 0;
        for piece in s.rest() {
            let n = piece.len().min(room - moved);
            if n > 0 {
                segment.ring_write(ring + CONTROL, RING, at.head + moved as u64, &piece[..n]);
                moved += n;
            }
        }
        if moved == 0 {
            return Ok(false);
        }
        s.written += moved;
        at.head += moved as u64;
        segment.word(ring).store(at.head, Ordering::Release);
        ring_bell(segment.bell());
        Ok(true)
    }

    /// Moves what can move now on both sides of an exchange; whether anything moved.
    fn step(
        &self,
        sending: &mut Option<Send<'_>>,
        receiving: &mut Option<Receive<'_, '_>>,
    ) -> Result<bool, TransportError> {
        let mut moved = false;
        if let Some(s) = sending.as_mut().filter(|s| !s.done()) {
            moved |= self.push(s)?;
        }
        if let Some(r) = receiving.as_mut().filter(|r| !r.done()) {
            moved |= self.pull(r)?;
        }
        Ok(moved)
    }
}

impl Transport for ShmTransport {
    fn rank(&self) -> usize {
        self.members[self.rank]
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    /// All on one host.
    fn host_of(&self, _rank: usize) -> usize {
        0
    }

    /// Peers are job ranks; errors name job ranks too.
    fn exchange(
        &self,
        envelope: &Envelope,
        screen: Screen<'_>,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        let recv = recv.map(|(peer, out)| (peer, Target::Buffer(out)));
        self.exchange_job(envelope, screen, send, recv, deadline)
    }

    /// Folds straight from the ring: `scratch` only sets the length.
    fn exchange_fold(
        &self,
        envelope: &Envelope,
        screen: Screen<'_>,
        send: Option<(usize, &[u8])>,
        recv: Option<Fold<'_>>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        let recv = recv.map(
            |Fold {
                 peer,
                 scratch,
                 fold,
             }| (peer, Target::Fold { scratch, fold }),
        );
        self.exchange_job(envelope, screen, send, recv, deadline)
    }
}

impl ShmTransport {
    /// An exchange with peers named by job ranks; errors name job ranks too.
    fn exchange_job(
        &self,
        envelope: &Envelope,
        screen: Screen<'_>,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, Target<'_>)>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        let local = |peer: usize| {
            self.members
                .iter()
                .position(|&m| m == peer)
                .ok_or_else(|| TransportError::Broken {
                    peer,
                    reason: "not on this host's shared memory".into(),
                })
        };
        let mut sending = match send {
            Some((p, payload)) => Some(Send::new(local(p)?, envelope, payload)),
            None => None,
        };
        let mut receiving = match recv {
            Some((p, out)) => Some(Receive::new(local(p)?, envelope.tag, screen, out)),
            None => None,
        };
        let result = self.drive(&mut sending, &mut receiving, deadline);
        if let Some(s) = sending.filter(|s| s.mid_frame()) {
            locked(&self.outbound[s.peer]).unsendable.get_or_insert_with(|| {
                format!("an earlier send to rank {} stopped inside a frame; rebuild the communicator", self.members[s.peer])
            });
        }
        if let Some(r) = receiving {
            let peer = r.peer;
            r.end(&mut locked(&self.inbound[peer]).inbox);
        }
        result.map_err(|e| e.with_peer_map(&self.members))
    }

    /// Moves both halves until both are done or the deadline passes; peers are group indexes.
    fn drive(
        &self,
        sending: &mut Option<Send<'_>>,
        receiving: &mut Option<Receive<'_, '_>>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        let until = Instant::now() + deadline;
        let mut idle = 0u32;
        loop {
            let bell = self.segments[self.rank].bell();
            let seen = bell.load(Ordering::Acquire);
            let moved = self.step(sending, receiving)?;
            let awaited = receiving.as_ref().filter(|r| !r.done()).map(|r| r.peer);
            let feeding = sending.as_ref().filter(|s| !s.done()).map(|s| s.peer);
            let Some(peer) = awaited.or(feeding) else {
                return Ok(());
            };
            if moved {
                idle = 0;
                continue;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Timeout {
                    peer,
                    after: deadline,
                });
            }
            idle += 1;
            if idle < SPINS {
                if self.oversubscribed {
                    // More ranks than cores: the peer awaited may need this very core.
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            // Sleep until a peer rings (the bell changed since `seen`), bounded.
            futex_wait(bell, seen, left.min(Duration::from_millis(100)));
            // A peer that died rings no more: look for it rather than wait out the deadline.
            for peer in awaited.into_iter().chain(feeding) {
                if !self.segments[peer].owner_alive() {
                    // All a dead process wrote is in the ring now: one last try before
                    // declaring it gone (it may have sent its last message and exited).
                    if self.step(sending, receiving)? {
                        break;
                    }
                    return Err(TransportError::Broken {
                        peer,
                        reason: "its process is gone".into(),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
