//! Collectives that overlap computation: each call queues the collective on a thread of the
//! communicator's own and returns a [`Handle`] to wait on.
//!
//! # Guarantees
//! - Collectives run in the order they were queued, so ranks that queue the same sequence
//!   stay matched, as with blocking calls.
//! - Buffers are moved in and handed back by [`Handle::wait`]: no borrow outlives the call.

use std::sync::mpsc;
use std::thread::JoinHandle;

use super::{CommError, Communicator};
use crate::reduce::{Element, ReduceOp};
use crate::transport::Transport;

type Job<T> = Box<dyn FnOnce(&Communicator<T>) + Send>;

/// A communicator whose collectives run asynchronously, in order.
#[derive(Debug)]
pub struct AsyncCommunicator<T: Transport + 'static> {
    jobs: Option<mpsc::Sender<Job<T>>>,
    worker: Option<JoinHandle<()>>,
    rank: usize,
    size: usize,
}

/// The pending result of a queued collective.
#[derive(Debug)]
pub struct Handle<R> {
    result: mpsc::Receiver<Result<R, CommError>>,
}

impl<R> Handle<R> {
    /// Waits for the collective; its result (the buffer, for most collectives).
    ///
    /// # Errors
    /// The collective's error, or [`CommError::Invalid`] if the communicator's thread is gone.
    pub fn wait(self) -> Result<R, CommError> {
        self.result.recv().unwrap_or_else(|_| {
            Err(CommError::Invalid {
                op: "wait",
                what: "the communicator's thread ended before this collective ran".into(),
            })
        })
    }
}

impl<T: Transport + 'static> AsyncCommunicator<T> {
    /// Moves `comm` onto a thread of its own.
    ///
    /// # Errors
    /// [`CommError::Invalid`] when the thread cannot be started.
    pub fn new(comm: Communicator<T>) -> Result<Self, CommError> {
        let (rank, size) = (comm.rank(), comm.size());
        let (jobs, queue) = mpsc::channel::<Job<T>>();
        let worker = std::thread::Builder::new()
            .name("ferrun-comm".into())
            .spawn(move || {
                for job in queue {
                    job(&comm);
                }
            })
            .map_err(|e| CommError::Invalid {
                op: "AsyncCommunicator::new",
                what: format!("cannot start its thread: {e}"),
            })?;
        Ok(Self {
            jobs: Some(jobs),
            worker: Some(worker),
            rank,
            size,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Queues `f` to run on the communicator's thread after everything queued before it.
    pub fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Communicator<T>) -> Result<R, CommError> + Send + 'static,
    ) -> Handle<R> {
        let (tx, result) = mpsc::channel();
        let job: Job<T> = Box::new(move |comm| {
            let _ = tx.send(f(comm));
        });
        if let Some(jobs) = &self.jobs {
            // A send fails only when the thread is gone; the handle then reports it.
            let _ = jobs.send(job);
        }
        Handle { result }
    }

    /// [`Communicator::all_reduce`] on `buf`, returned by the handle.
    pub fn all_reduce<E: Element>(&self, mut buf: Vec<E>, op: ReduceOp) -> Handle<Vec<E>> {
        self.submit(move |c| c.all_reduce(&mut buf, op).map(|()| buf))
    }

    /// [`Communicator::broadcast`] of `buf` from `root`.
    pub fn broadcast<E: Element>(&self, mut buf: Vec<E>, root: usize) -> Handle<Vec<E>> {
        self.submit(move |c| c.broadcast(&mut buf, root).map(|()| buf))
    }

    /// [`Communicator::all_gather`] of `input`; the handle gives the gathered buffer.
    pub fn all_gather<E: Element>(&self, input: Vec<E>) -> Handle<Vec<E>> {
        self.submit(move |c| {
            let mut out = vec![E::ZERO; input.len() * c.size()];
            c.all_gather(&input, &mut out).map(|()| out)
        })
    }

    /// [`Communicator::reduce_scatter`] of `input`; the handle gives this rank's block.
    pub fn reduce_scatter<E: Element>(&self, input: Vec<E>, op: ReduceOp) -> Handle<Vec<E>> {
        self.submit(move |c| {
            let mut out = vec![E::ZERO; input.len() / c.size().max(1)];
            c.reduce_scatter(&input, &mut out, op).map(|()| out)
        })
    }

    /// [`Communicator::barrier`].
    pub fn barrier(&self) -> Handle<()> {
        self.submit(Communicator::barrier)
    }
}

impl<T: Transport + 'static> Drop for AsyncCommunicator<T> {
    /// Runs what is queued, then stops the thread.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
