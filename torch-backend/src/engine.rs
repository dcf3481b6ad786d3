//! Where a group's ops run: in call order, on the group's own thread — or, for a small
//! collective called while nothing is queued, at once on the caller's thread (with the GIL
//! released), which saves the two thread hand-overs that would otherwise be most of its cost.
//!
//! # Guarantees
//! - Ops run one at a time, in the order they were called: an op run on the caller's thread
//!   holds the same lock the group's thread takes for each queued op, and runs only when nothing
//!   is queued, so no op overtakes another.
//! - Dropping the engine runs what is queued, then ends the thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use ferrun_collective::comm::Communicator;
use ferrun_collective::transport::Auto;

/// The group's communicator.
pub(crate) type Comm = Communicator<Auto>;

/// An op, with what completes it.
pub(crate) type Job = Box<dyn FnOnce(&Comm) + Send>;

struct Shared {
    comm: Comm,
    /// Held while an op runs, wherever it runs.
    running: Mutex<()>,
    /// Ops queued and not yet finished.
    queued: AtomicUsize,
}

/// A communicator and the thread its queued ops run on.
pub(crate) struct Engine {
    shared: Arc<Shared>,
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the group's thread.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub(crate) fn new(comm: Comm) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            comm,
            running: Mutex::new(()),
            queued: AtomicUsize::new(0),
        });
        let (jobs, queue) = mpsc::channel::<Job>();
        let on_thread = Arc::clone(&shared);
        let worker = std::thread::Builder::new()
            .name("ferrun-comm".into())
            .spawn(move || {
                for job in queue {
                    let running = on_thread
                        .running
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    job(&on_thread.comm);
                    drop(running);
                    on_thread.queued.fetch_sub(1, Ordering::AcqRel);
                }
            })?;
        Ok(Self {
            shared,
            jobs: Some(jobs),
            worker: Some(worker),
        })
    }

    /// Queues `job` after everything queued before it.
    pub(crate) fn submit(&self, job: Job) {
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        if let Some(jobs) = &self.jobs {
            if let Err(mpsc::SendError(job)) = jobs.send(job) {
                // The thread is gone (it never ends while the sender lives): run it here.
                self.shared.queued.fetch_sub(1, Ordering::AcqRel);
                job(&self.shared.comm);
            }
        }
    }

    /// Runs `job` on this thread if nothing is queued (its result), else hands it back.
    pub(crate) fn run_if_idle<R, J: FnOnce(&Comm) -> R>(&self, job: J) -> Result<R, J> {
        if self.shared.queued.load(Ordering::Acquire) != 0 {
            return Err(job);
        }
        let running = self
            .shared
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Queued meanwhile (by another Python thread): it must run first.
        if self.shared.queued.load(Ordering::Acquire) != 0 {
            return Err(job);
        }
        let outcome = job(&self.shared.comm);
        drop(running);
        Ok(outcome)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
