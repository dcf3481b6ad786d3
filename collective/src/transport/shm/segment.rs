//! A rank's shared-memory segment: an anonymous memory file (`memfd`), sealed at its size,
//! locked by its owner for as long as the owner lives, mapped by every rank of the host.
//!
//! # Trust
//! A segment handed over by a peer is checked before it is mapped: a regular memory file of
//! this user, of exactly the expected size, sealed against shrinking and growing (so it can
//! never SIGBUS under a reader). It is reopened through `/proc/self/fd`, so this rank's view of
//! the owner's lock is its own. Its contents stay untrusted: ring counters are validated on
//! every read (see `Inbound`/`Outbound` in the parent module).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};

/// Seals every segment carries: its size is fixed for good.
const SEALS: SealFlag = SealFlag::F_SEAL_SHRINK
    .union(SealFlag::F_SEAL_GROW)
    .union(SealFlag::F_SEAL_SEAL);

/// One mapped segment.
#[derive(Debug)]
pub(super) struct Segment {
    base: NonNull<u8>,
    len: usize,
    /// The memory file: the owner's holds the liveness lock; a peer's is probed for it.
    file: File,
}

// SAFETY: the mapping is plain shared memory; all access to it goes through atomics or through
// ranges that the ring protocol hands to exactly one side at a time.
#[allow(unsafe_code)]
unsafe impl Send for Segment {}
#[allow(unsafe_code)]
unsafe impl Sync for Segment {}

impl Drop for Segment {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: `base`/`len` came from a successful mmap and are unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn lock(kind: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    }
}

impl Segment {
    /// A fresh segment of `len` zero bytes, sealed, locked by this process, mapped.
    pub(super) fn create(len: usize) -> std::io::Result<Self> {
        let fd = memfd_create(
            c"ferrun-shm",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let file = File::from(fd);
        file.set_len(len as u64)?;
        fcntl(&file, FcntlArg::F_ADD_SEALS(SEALS))?;
        // An open-file-description lock: the kernel drops it when this process is gone, in
        // whatever PID namespace its peers live.
        fcntl(&file, FcntlArg::F_OFD_SETLK(&lock(libc::F_WRLCK)))?;
        Self::map(file, len)
    }

    /// Maps a peer's segment handed over as `fd`, after checking that it is one.
    pub(super) fn adopt(fd: OwnedFd, len: usize) -> Result<Self, String> {
        // A description of our own, so that the owner's lock is visible from it.
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let file = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot reopen the handed-over segment: {e}"))?;
        drop(fd);
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot stat the handed-over segment: {e}"))?;
        if !meta.file_type().is_file() {
            return Err("what it handed over is not a memory file".into());
        }
        if meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(format!(
                "its segment belongs to user {}, not this one",
                meta.uid()
            ));
        }
        if meta.size() != len as u64 {
            return Err(format!(
                "its segment has {} bytes where {len} were expected (ranks of different builds?)",
                meta.size()
            ));
        }
        let seals = fcntl(&file, FcntlArg::F_GET_SEALS)
            .map_err(|e| format!("its segment is not a sealed memory file: {e}"))?;
        if !SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK) {
            return Err("its segment is not sealed against shrinking".into());
        }
        Self::map(file, len).map_err(|e| format!("cannot map its segment: {e}"))
    }

    #[allow(unsafe_code)]
    fn map(file: File, len: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh shared mapping of a file of exactly `len` bytes that cannot shrink;
        // checked for failure.
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
        Ok(Self { base, len, file })
    }

    /// The memory file, to hand over to peers.
    pub(super) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Whether the segment's owner still holds its lock (is alive).
    pub(super) fn owner_alive(&self) -> bool {
        let mut probe = lock(libc::F_RDLCK);
        match fcntl(&self.file, FcntlArg::F_OFD_GETLK(&mut probe)) {
            Ok(_) => probe.l_type != libc::F_UNLCK as libc::c_short,
            // Cannot tell: assume alive (the deadline still bounds the wait).
            Err(_) => true,
        }
    }

    /// The 8-byte word at `offset`.
    #[allow(unsafe_code)]
    pub(super) fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(
            offset % 8 == 0 && offset + 8 <= self.len,
            "word out of bounds"
        );
        // SAFETY: in bounds, 8-aligned (the mapping is page aligned), and only ever accessed
        // atomically; the reference lives no longer than the mapping.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    /// The doorbell: the futex word at offset 0.
    #[allow(unsafe_code)]
    pub(super) fn bell(&self) -> &AtomicU32 {
        // SAFETY: as `word`, at offset 0.
        unsafe { &*self.base.as_ptr().cast::<AtomicU32>() }
    }

    /// Copies `bytes` into the ring of `ring_len` bytes at `data` (an offset), at position
    /// `pos` (which may wrap).
    #[allow(unsafe_code)]
    pub(super) fn ring_write(&self, data: usize, ring_len: usize, pos: u64, bytes: &[u8]) {
        let at = (pos as usize) & (ring_len - 1);
        let first = bytes.len().min(ring_len - at);
        assert!(
            data + ring_len <= self.len && bytes.len() <= ring_len,
            "ring out of bounds"
        );
        // SAFETY: both ranges lie inside the ring's data area (checked above), which the ring
        // protocol gives the producer alone (free space between tail and head + ring_len).
        unsafe {
            let base = self.base.as_ptr().add(data);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(at), first);
            std::ptr::copy_nonoverlapping(bytes.as_ptr().add(first), base, bytes.len() - first);
        }
    }

    /// The `len` bytes of the ring at `data` at position `pos` (which may wrap), as two views.
    #[allow(unsafe_code)]
    pub(super) fn ring_view(
        &self,
        data: usize,
        ring_len: usize,
        pos: u64,
        len: usize,
    ) -> [&[u8]; 2] {
        let at = (pos as usize) & (ring_len - 1);
        let first = len.min(ring_len - at);
        assert!(
            data + ring_len <= self.len && len <= ring_len,
            "ring out of bounds"
        );
        // SAFETY: both ranges lie inside the ring's data area (checked above), filled and
        // handed to the consumer alone until it moves the tail past them.
        unsafe {
            let base = self.base.as_ptr().add(data);
            [
                std::slice::from_raw_parts(base.add(at), first),
                std::slice::from_raw_parts(base, len - first),
            ]
        }
    }
}
