//! Shared memory between the ranks of one host.
//!
//! Every rank owns a segment holding a doorbell and one inbound ring per peer. A sender copies
//! frames (header with tag, length and call; payload) into its ring in the receiver's segment; a receiver
//! copies them out straight into the typed buffer, or reduces them straight from the ring
//! (`Transport::exchange_fold`). Progress is announced by bumping the other
//! side's doorbell, a futex word: a rank with nothing to do sleeps on its own doorbell, so
//! waiting ranks leave the cores to the working ones.
//!
//! # Guarantees
//! - Segments are unlinked from `/dev/shm` as soon as every rank has mapped them: nothing is
//!   left behind, even when a process is killed (the kernel frees the memory with the last map).
//! - Every wait is bounded by the exchange's deadline.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::label::{accept, frame_header, parse_frame_header, Stash, FRAME_HEADER};
use super::{Fold, Label, Transport, TransportError};
use crate::store::{StoreClient, StoreError};

/// Bytes of each inbound ring (a power of two).
const RING: usize = 1 << 20;
/// Ring control block: producer and consumer counters on cache lines of their own.
const CONTROL: usize = 128;
/// Doorbell area at the start of a segment: the futex word, then the creator's pid.
const BELL: usize = 64;
const PID: usize = 8;
/// Spins on the rings before sleeping on the doorbell (cheap for short waits).
const SPINS: u32 = 200;

/// Why the segments could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The store failed (segment names are exchanged through it).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file or mapping operation failed.
    #[error("shared memory: cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

/// One mapped segment.
#[derive(Debug)]
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access to it goes through atomics or through
// ranges that the ring protocol hands to exactly one side at a time.
#[allow(unsafe_code)]
unsafe impl Send for Mapping {}
#[allow(unsafe_code)]
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: `base`/`len` came from a successful mmap and are unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn segment_len(size: usize) -> usize {
    BELL + size * (CONTROL + RING)
}

impl Mapping {
    #[allow(unsafe_code)]
    fn open(path: &PathBuf, len: usize, create: bool) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create)
            .open(path)?;
        if create {
            file.set_len(len as u64)?;
        }
        // SAFETY: a fresh shared mapping of a file of at least `len` bytes; checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(Self { base, len })
    }

    #[allow(unsafe_code)]
    fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset % 8 == 0 && offset + 8 <= self.len);
        // SAFETY: in bounds, 8-aligned (the mapping is page aligned), and only ever accessed
        // atomically; the reference lives no longer than the mapping.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn bell(&self) -> &AtomicU32 {
        #[allow(unsafe_code)]
        // SAFETY: as `atomic_u64`, at offset 0.
        unsafe {
            &*self.base.as_ptr().cast::<AtomicU32>()
        }
    }

    fn ring_base(&self, from: usize) -> usize {
        BELL + from * (CONTROL + RING)
    }
}

/// Copies `bytes` into a ring at a position that may wrap.
#[allow(unsafe_code)]
fn ring_write(map: &Mapping, ring: usize, pos: u64, bytes: &[u8]) {
    let at = (pos as usize) & (RING - 1);
    let first = bytes.len().min(RING - at);
    // SAFETY: both ranges lie inside this ring's data area, which the ring protocol gives the
    // producer alone (free space between tail and head + RING).
    unsafe {
        let base = map.base.as_ptr().add(ring + CONTROL);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(at), first);
        std::ptr::copy_nonoverlapping(bytes.as_ptr().add(first), base, bytes.len() - first);
    }
}

/// The `len` bytes of a ring at a position that may wrap, as one or two views.
#[allow(unsafe_code)]
fn ring_view(map: &Mapping, ring: usize, pos: u64, len: usize) -> [&[u8]; 2] {
    let at = (pos as usize) & (RING - 1);
    let first = len.min(RING - at);
    // SAFETY: both ranges lie inside this ring's data area, filled and handed to the consumer
    // alone until it moves the tail past them (after the views are dropped).
    unsafe {
        let base = map.base.as_ptr().add(ring + CONTROL);
        [
            std::slice::from_raw_parts(base.add(at), first),
            std::slice::from_raw_parts(base, len - first),
        ]
    }
}

/// Copies from a ring at a position that may wrap into `bytes`.
#[allow(unsafe_code)]
fn ring_read(map: &Mapping, ring: usize, pos: u64, bytes: &mut [u8]) {
    let at = (pos as usize) & (RING - 1);
    let first = bytes.len().min(RING - at);
    // SAFETY: both ranges lie inside this ring's data area, which the ring protocol gives the
    // consumer alone (filled space between tail and head).
    unsafe {
        let base = map.base.as_ptr().add(ring + CONTROL);
        std::ptr::copy_nonoverlapping(base.add(at), bytes.as_mut_ptr(), first);
        std::ptr::copy_nonoverlapping(base, bytes.as_mut_ptr().add(first), bytes.len() - first);
    }
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
    segments: Vec<Mapping>,
    /// Frames read from a peer for tags not asked for yet.
    early: Vec<Mutex<Stash>>,
    /// More ranks share this host's memory than there are cores for them.
    oversubscribed: bool,
}

impl ShmTransport {
    /// Creates this rank's segment, maps every peer's (names exchanged under `store`), then
    /// unlinks its own once all are mapped. Every rank of the job is in the group.
    ///
    /// # Errors
    /// [`ShmError`] naming the store or file operation that failed.
    pub async fn connect(
        store: &mut StoreClient,
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
        store: &mut StoreClient,
        members: Vec<usize>,
        me: usize,
        timeout: Duration,
    ) -> Result<Self, ShmError> {
        let size = members.len();
        let rank = members.iter().position(|&m| m == me).unwrap_or(0);
        let group = members.first().copied().unwrap_or(0);
        let io = |what: String| move |source| ShmError::Io { what, source };
        remove_stale_segments();
        let len = segment_len(size);
        // Unique per process and segment; the pid first, for `remove_stale_segments`.
        static SEGMENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let serial = SEGMENTS.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!(
            "/dev/shm/ferrun-{}-{serial}-{me}",
            std::process::id()
        ));
        let own = Mapping::open(&path, len, true).map_err(io(format!(
            "create {} ({len} bytes; is /dev/shm large enough?)",
            path.display()
        )))?;
        // The creator's pid, so that peers can tell when this process is gone.
        own.atomic_u64(PID)
            .store(u64::from(std::process::id()), Ordering::Release);
        store
            .set(&format!("shm/{me}"), path.display().to_string().as_bytes())
            .await?;
        let mut segments = Vec::with_capacity(size);
        let mut own = Some(own);
        for (i, &peer) in members.iter().enumerate() {
            if i == rank {
                segments.extend(own.take());
                continue;
            }
            let name =
                String::from_utf8_lossy(&store.get(&format!("shm/{peer}")).await?).into_owned();
            segments.push(
                Mapping::open(&PathBuf::from(&name), len, false)
                    .map_err(io(format!("map rank {peer}'s segment {name}")))?,
            );
        }
        let (mapped, all_mapped) = (
            format!("shm/group_{group}/mapped"),
            format!("shm/group_{group}/all_mapped"),
        );
        if store.add(&mapped, 1).await? == size as i64 {
            store.set(&all_mapped, b"").await?;
        }
        store.wait(&[&all_mapped], timeout).await?;
        std::fs::remove_file(&path).map_err(io(format!("unlink {}", path.display())))?;
        Ok(Self {
            rank,
            members,
            segments,
            early: (0..size).map(|_| Mutex::new(Stash::default())).collect(),
            oversubscribed: std::thread::available_parallelism().map_or(true, |c| size > c.get()),
        })
    }

    /// The pid of `peer`'s process when that process no longer runs.
    fn gone(&self, peer: usize) -> Option<u64> {
        let pid = self.segments[peer].atomic_u64(PID).load(Ordering::Acquire);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        // A zombie has exited too (its parent has not reaped it yet).
        let running = stat
            .as_deref()
            .and_then(|s| s.rsplit_once(") "))
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|c| c != 'Z' && c != 'X');
        (pid != 0 && !running).then_some(pid)
    }

    /// The ring carrying `from → to`, in `to`'s segment.
    fn ring(&self, from: usize, to: usize) -> (&Mapping, usize) {
        let map = &self.segments[to];
        (map, map.ring_base(from))
    }
}

/// Age past which an unmapped segment of a dead process counts as left behind.
const STALE_AFTER: Duration = Duration::from_secs(60);

/// Removes segments left in `/dev/shm` by processes that died before every rank had mapped
/// them (after that, segments are unlinked already). Their creator's pid is in their name.
pub fn remove_stale_segments() {
    let Ok(entries) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("ferrun-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<i32>().ok());
        // Only old files: a process in another pid namespace sharing /dev/shm looks dead from
        // here, but its bootstrap window is milliseconds long.
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_AFTER);
        if let (Some(pid), true) = (pid, old) {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Progress of the send side of an exchange.
struct Sending<'a> {
    peer: usize,
    header: [u8; FRAME_HEADER],
    payload: &'a [u8],
    written: usize,
}

impl Sending<'_> {
    /// Whether the whole frame is in the ring.
    fn done(&self) -> bool {
        self.written == FRAME_HEADER + self.payload.len()
    }
}

/// The frame being read from a peer.
enum Current {
    /// A frame for the awaited tag, landing straight in the receive buffer.
    Direct { copied: usize },
    /// A frame for another tag, kept for its own receive.
    Early {
        label: Label,
        buf: Vec<u8>,
        copied: usize,
    },
}

/// Where an awaited frame's payload goes.
enum Target<'a> {
    /// Into a buffer.
    Buffer(&'a mut [u8]),
    /// To a fold, straight from the ring.
    Fold {
        len: usize,
        fold: &'a mut dyn FnMut(&[u8]),
    },
}

impl Target<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Buffer(out) => out.len(),
            Self::Fold { len, .. } => *len,
        }
    }

    /// Takes a whole payload kept earlier.
    fn take(&mut self, payload: &[u8]) {
        match self {
            Self::Buffer(out) => out.copy_from_slice(payload),
            Self::Fold { fold, .. } => fold(payload),
        }
    }
}

/// Progress of the receive side.
struct Receiving<'a> {
    peer: usize,
    out: Target<'a>,
    current: Option<Current>,
    done: bool,
}

impl ShmTransport {
    /// Moves what can move now on both sides of an exchange; whether anything moved.
    fn step(
        &self,
        sending: &mut Option<Sending<'_>>,
        receiving: &mut Option<Receiving<'_>>,
        label: &Label,
    ) -> Result<bool, TransportError> {
        let mut moved = false;
        if let Some(s) = sending.as_mut().filter(|s| !s.done()) {
            moved |= self.push(s);
        }
        if let Some(r) = receiving.as_mut().filter(|r| !r.done) {
            moved |= self.pull(r, label)?;
        }
        Ok(moved)
    }

    /// Writes as much of the frame as the ring has room for; whether anything moved.
    fn push(&self, s: &mut Sending<'_>) -> bool {
        let (map, ring) = self.ring(self.rank, s.peer);
        let (head, tail) = (map.atomic_u64(ring), map.atomic_u64(ring + 64));
        let h = head.load(Ordering::Relaxed);
        let room = RING - (h - tail.load(Ordering::Acquire)) as usize;
        let n = room.min(FRAME_HEADER + s.payload.len() - s.written);
        if n == 0 {
            return false;
        }
        let (mut pos, mut left) = (h, n);
        if s.written < FRAME_HEADER {
            let k = left.min(FRAME_HEADER - s.written);
            ring_write(map, ring, pos, &s.header[s.written..s.written + k]);
            (pos, left, s.written) = (pos + k as u64, left - k, s.written + k);
        }
        if left > 0 {
            let from = s.written - FRAME_HEADER;
            ring_write(map, ring, pos, &s.payload[from..from + left]);
            s.written += left;
        }
        head.store(h + n as u64, Ordering::Release);
        ring_bell(self.segments[s.peer].bell());
        true
    }

    /// Consumes what the peer's ring holds, without waiting; whether anything moved.
    fn pull(&self, r: &mut Receiving<'_>, label: &Label) -> Result<bool, TransportError> {
        let (map, ring) = self.ring(r.peer, self.rank);
        let (head, tail) = (map.atomic_u64(ring), map.atomic_u64(ring + 64));
        let mut moved = false;
        loop {
            let t = tail.load(Ordering::Relaxed);
            let available = (head.load(Ordering::Acquire) - t) as usize;
            if r.current.is_none() {
                let mut early = self.early[r.peer]
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(payload) = early.take(r.peer, label, r.out.len())? {
                    r.out.take(&payload);
                    r.done = true;
                    return Ok(true);
                }
                if available < FRAME_HEADER {
                    if moved {
                        ring_bell(self.segments[r.peer].bell());
                    }
                    return Ok(moved);
                }
                let mut header = [0u8; FRAME_HEADER];
                ring_read(map, ring, t, &mut header);
                tail.store(t + FRAME_HEADER as u64, Ordering::Release);
                moved = true;
                let (theirs, len) = parse_frame_header(&header);
                r.current = Some(if accept(r.peer, label, r.out.len(), &theirs, len)? {
                    Current::Direct { copied: 0 }
                } else {
                    Current::Early {
                        label: theirs,
                        buf: vec![0u8; len],
                        copied: 0,
                    }
                });
                continue;
            }
            let (len, copied) = match r.current.as_mut() {
                Some(Current::Direct { copied }) => (r.out.len(), copied),
                Some(Current::Early { buf, copied, .. }) => (buf.len(), copied),
                None => return Ok(moved),
            };
            let n = available.min(len - *copied);
            if n > 0 {
                let at = *copied;
                match (r.current.as_mut(), &mut r.out) {
                    (Some(Current::Early { buf, .. }), _) => {
                        ring_read(map, ring, t, &mut buf[at..at + n]);
                    }
                    (Some(Current::Direct { .. }), Target::Buffer(out)) => {
                        ring_read(map, ring, t, &mut out[at..at + n]);
                    }
                    (Some(Current::Direct { .. }), Target::Fold { fold, .. }) => {
                        for piece in ring_view(map, ring, t, n) {
                            fold(piece);
                        }
                    }
                    (None, _) => {}
                }
                tail.store(t + n as u64, Ordering::Release);
                moved = true;
            }
            let copied = match r.current.as_mut() {
                Some(Current::Direct { copied } | Current::Early { copied, .. }) => {
                    *copied += n;
                    *copied
                }
                None => 0,
            };
            if copied < len {
                if moved {
                    ring_bell(self.segments[r.peer].bell());
                }
                return Ok(moved);
            }
            match r.current.take() {
                Some(Current::Early {
                    label: other, buf, ..
                }) => {
                    self.early[r.peer]
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .keep(other, buf);
                }
                _ => {
                    r.done = true;
                    ring_bell(self.segments[r.peer].bell());
                    return Ok(true);
                }
            }
        }
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
        label: Label,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        let recv = recv.map(|(peer, out)| (peer, Target::Buffer(out)));
        self.exchange_job(label, send, recv, deadline)
    }

    /// Folds straight from the ring: `scratch` is not used.
    fn exchange_fold(
        &self,
        label: Label,
        send: Option<(usize, &[u8])>,
        recv: Option<Fold<'_>>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        let recv = recv.map(
            |Fold {
                 peer,
                 scratch,
                 fold,
             }| {
                let len = scratch.len();
                (peer, Target::Fold { len, fold })
            },
        );
        self.exchange_job(label, send, recv, deadline)
    }
}

impl ShmTransport {
    /// An exchange with peers named by job ranks; errors name job ranks too.
    fn exchange_job(
        &self,
        label: Label,
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
        let send = send.map(|(p, b)| local(p).map(|l| (l, b))).transpose()?;
        let recv = recv.map(|(p, t)| local(p).map(|l| (l, t))).transpose()?;
        self.exchange_local(label, send, recv, deadline)
            .map_err(|e| e.with_peer_map(&self.members))
    }

    /// An exchange with peers as indexes into `members`.
    fn exchange_local(
        &self,
        label: Label,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, Target<'_>)>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        let until = Instant::now() + deadline;
        let mut sending = send.map(|(peer, payload)| {
            let header = frame_header(&label, payload.len());
            Sending {
                peer,
                header,
                payload,
                written: 0,
            }
        });
        let mut receiving = recv.map(|(peer, out)| Receiving {
            peer,
            out,
            current: None,
            done: false,
        });
        let mut idle = 0u32;
        loop {
            let bell = self.segments[self.rank].bell();
            let seen = bell.load(Ordering::Acquire);
            let moved = self.step(&mut sending, &mut receiving, &label)?;
            let send_done = sending.as_ref().is_none_or(Sending::done);
            let recv_done = receiving.as_ref().is_none_or(|r| r.done);
            if send_done && recv_done {
                return Ok(());
            }
            if moved {
                idle = 0;
                continue;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let peer = if recv_done {
                    sending.map_or(0, |s| s.peer)
                } else {
                    receiving.map_or(0, |r| r.peer)
                };
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
            } else {
                // Sleep until a peer rings (the bell changed since `seen`), bounded.
                futex_wait(bell, seen, left.min(Duration::from_millis(100)));
                // A peer that died rings no more: look for it rather than wait out the deadline.
                let awaited = receiving.as_ref().filter(|r| !r.done).map(|r| r.peer);
                let feeding = sending.as_ref().filter(|s| !s.done()).map(|s| s.peer);
                for peer in awaited.into_iter().chain(feeding) {
                    if let Some(pid) = self.gone(peer) {
                        // All a dead process wrote is in the ring now: one last try before
                        // declaring it gone (it may have sent its last message and exited).
                        if self.step(&mut sending, &mut receiving, &label)? {
                            break;
                        }
                        return Err(TransportError::Broken {
                            peer,
                            reason: format!("its process {pid} is gone"),
                        });
                    }
                }
            }
        }
    }
}
