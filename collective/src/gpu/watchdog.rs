//! The deadline of a GPU collective. NCCL has no per-op timeout: an op whose peer died spins on
//! the GPU for ever. The waiting thread polls the stream and `ncclCommGetAsyncError`, and
//! [`judge`] says, from what it saw, whether the op is done, failed, past its deadline (the
//! caller then aborts the communicator, so that every rank's op ends) or worth another poll.
//!
//! Pure: the driver ([`super::nccl`]) does the polling.

use std::time::Duration;

/// `ncclSuccess`.
pub const NCCL_SUCCESS: i32 = 0;
/// `ncclInProgress`: a non-blocking call still running, not an error.
pub const NCCL_IN_PROGRESS: i32 = 7;

/// What one poll saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poll {
    /// Time since the op was enqueued.
    pub elapsed: Duration,
    /// Whether the stream has run everything enqueued on it.
    pub stream_done: bool,
    /// `ncclCommGetAsyncError`'s code.
    pub async_error: i32,
    /// Polls made before this one.
    pub polls: u32,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The op completed.
    Done,
    /// NCCL reported this error code: abort the communicator.
    Failed(i32),
    /// Past the deadline: abort the communicator.
    TimedOut,
    /// Poll again after this pause (zero: yield the CPU once).
    Wait(Duration),
}

/// Polls before pausing grows past a yield: a small op on NVLink ends in tens of µs.
const SPIN_POLLS: u32 = 200;
/// The longest pause between polls: what a timeout may overshoot by, and small against any
/// deadline a user sets.
const MAX_PAUSE: Duration = Duration::from_millis(1);

/// Judges one poll against `deadline`. An NCCL error wins over completion (the result would be
/// garbage); completion wins over the deadline (the op made it).
pub fn judge(poll: Poll, deadline: Duration) -> Verdict {
    if poll.async_error != NCCL_SUCCESS && poll.async_error != NCCL_IN_PROGRESS {
        return Verdict::Failed(poll.async_error);
    }
    if poll.stream_done {
        return Verdict::Done;
    }
    if poll.elapsed >= deadline {
        return Verdict::TimedOut;
    }
    Verdict::Wait(pause(poll.polls).min(deadline - poll.elapsed))
}

/// Zero (a yield) for the first polls, then doubling from 1 µs up to [`MAX_PAUSE`].
fn pause(polls: u32) -> Duration {
    match polls.checked_sub(SPIN_POLLS) {
        None => Duration::ZERO,
        Some(over) => Duration::from_micros(1u64 << over.min(10)).min(MAX_PAUSE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(ms: u64, stream_done: bool, async_error: i32, polls: u32) -> Poll {
        Poll {
            elapsed: Duration::from_millis(ms),
            stream_done,
            async_error,
            polls,
        }
    }

    const DEADLINE: Duration = Duration::from_secs(1);

    #[test]
    fn a_finished_op_is_done_even_at_its_deadline() {
        assert_eq!(judge(poll(0, true, 0, 0), DEADLINE), Verdict::Done);
        assert_eq!(judge(poll(5000, true, 0, 9), DEADLINE), Verdict::Done);
        assert_eq!(
            judge(poll(1, true, NCCL_IN_PROGRESS, 0), DEADLINE),
            Verdict::Done
        );
    }

    #[test]
    fn an_nccl_error_fails_the_op_even_when_the_stream_drained() {
        // ncclRemoteError (6): a peer went away.
        assert_eq!(judge(poll(1, true, 6, 0), DEADLINE), Verdict::Failed(6));
        assert_eq!(judge(poll(1, false, 2, 0), DEADLINE), Verdict::Failed(2));
    }

    #[test]
    fn a_pending_op_past_its_deadline_times_out() {
        assert_eq!(judge(poll(1000, false, 0, 7), DEADLINE), Verdict::TimedOut);
        assert_eq!(
            judge(poll(999, false, 0, 7), DEADLINE),
            Verdict::Wait(Duration::ZERO)
        );
    }

    #[test]
    fn polls_spin_first_then_back_off_to_a_millisecond_and_never_past_the_deadline() {
        assert_eq!(pause(0), Duration::ZERO);
        assert_eq!(pause(SPIN_POLLS - 1), Duration::ZERO);
        assert_eq!(pause(SPIN_POLLS), Duration::from_micros(1));
        assert_eq!(pause(SPIN_POLLS + 3), Duration::from_micros(8));
        assert_eq!(pause(SPIN_POLLS + 40), MAX_PAUSE);
        assert_eq!(pause(u32::MAX), MAX_PAUSE);
        let near = Poll {
            elapsed: DEADLINE - Duration::from_micros(100),
            ..poll(0, false, 0, SPIN_POLLS + 40)
        };
        assert_eq!(
            judge(near, DEADLINE),
            Verdict::Wait(Duration::from_micros(100))
        );
    }
}
