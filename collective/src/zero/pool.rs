//! Bucket buffers kept for reuse: a bucket's gradients (stages 2–3) and its gathered
//! parameters (stage 3) are needed for a moment each step; fresh allocations that size would
//! be fresh pages, faulted in and zeroed by the kernel every step.

use std::sync::{Arc, Mutex};

/// Buffers kept at most: two gathered buckets (the one in use, the prefetched) and two
/// gradient buckets (the one written, the one being reduced).
const KEEP: usize = 4;

/// Spare buffers, shared with the communicator's thread (which gives a gradient bucket back as
/// soon as it is reduced).
#[derive(Debug)]
pub(super) struct Pool<E>(Arc<Mutex<Vec<Vec<E>>>>);

impl<E> Clone for Pool<E> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<E: Copy> Pool<E> {
    pub(super) fn new() -> Self {
        Self(Arc::new(Mutex::new(Vec::new())))
    }

    fn spares(&self) -> std::sync::MutexGuard<'_, Vec<Vec<E>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A buffer of `len` elements, all `fill`.
    pub(super) fn take(&self, len: usize, fill: E) -> Vec<E> {
        let mut buf = self.take_any(len, fill);
        buf.fill(fill);
        buf
    }

    /// A buffer of `len` elements holding anything (a spare's old values, `fill` where it
    /// grew): for a buffer the caller overwrites whole, such as a gather's.
    pub(super) fn take_any(&self, len: usize, fill: E) -> Vec<E> {
        let spare = {
            let mut spares = self.spares();
            // The smallest that fits, so that large buffers stay for large buckets.
            let best = (0..spares.len())
                .filter(|&i| spares[i].capacity() >= len)
                .min_by_key(|&i| spares[i].capacity());
            best.map(|i| spares.swap_remove(i))
        };
        match spare {
            Some(mut buf) => {
                buf.resize(len, fill);
                buf
            }
            None => vec![fill; len],
        }
    }

    /// Keeps `buf` for reuse, or frees it when enough are kept (the smallest goes).
    pub(super) fn give(&self, buf: Vec<E>) {
        let mut spares = self.spares();
        spares.push(buf);
        if spares.len() > KEEP {
            if let Some(i) = (0..spares.len()).min_by_key(|&i| spares[i].capacity()) {
                spares.swap_remove(i);
            }
        }
    }

    /// Elements held in spares.
    pub(super) fn capacity(&self) -> usize {
        self.spares().iter().map(Vec::capacity).sum()
    }
}
