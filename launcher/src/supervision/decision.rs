//! What the agent does when an attempt ends, as a pure function of what happened and the
//! restarts left: the whole policy in one place, tested without a process.
//!
//! # Precedence
//! A signal to the launcher wins over everything (the user asked it to stop). Then a change
//! of membership of an elastic job: nodes joined (scale-up) or were lost with at least MIN
//! remaining restart the group without using a restart — also when workers here failed
//! meanwhile, since a peer that vanishes tears their connections; fewer than MIN remaining
//! ends the run naming the lost nodes. Then a failure of this node's workers or one reported
//! by another node (or the loss of what connects the nodes): each uses up a restart, and with
//! none left the run fails. With none of these, the attempt succeeded.

use nix::sys::signal::Signal;

/// A change of the job's nodes that ended an attempt (elastic rendezvous only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    /// Nodes joined while the job ran with room for them.
    ScaleUp,
    /// These nodes stopped sending heartbeats or left; `remaining` nodes are still there.
    Lost {
        /// The lost nodes, named as their agents joined.
        nodes: Vec<String>,
        /// The nodes left.
        remaining: u32,
    },
}

/// What happened during an attempt, as the agent saw it when the group had stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptEnd {
    /// The launcher got this signal (during the attempt, or while stopping it).
    pub signal: Option<Signal>,
    /// Workers of this node failed on their own (before the launcher stopped them).
    pub local_failure: bool,
    /// Another node's failure, in one line, or why the other nodes cannot be reached.
    pub remote_failure: Option<String>,
    /// The job's nodes changed.
    pub membership: Option<MembershipChange>,
}

/// What the run may still do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Counted restarts done so far.
    pub restarts_done: u32,
    /// `--max-restarts`.
    pub max_restarts: u32,
    /// MIN of `--nnodes` (1 for a static job).
    pub min_nodes: u32,
}

/// How the run ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every worker exited 0.
    Succeeded,
    /// This node's workers failed and no restart is left.
    Failed,
    /// Another node failed (this summary) and no restart is left.
    FailedElsewhere(String),
    /// The launcher was asked to stop by this signal.
    Signaled(Signal),
    /// Fewer than MIN nodes remain; these were lost.
    NodesLost {
        /// The lost nodes.
        nodes: Vec<String>,
        /// The nodes left.
        remaining: u32,
        /// MIN.
        min_nodes: u32,
    },
}

/// The agent's next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Start the group again; `counted` says whether it uses one of `--max-restarts`.
    Restart {
        /// Uses a restart.
        counted: bool,
    },
    /// End the run.
    Stop(Verdict),
}

/// The next step after `end`, given `budget`.
pub fn next(end: &AttemptEnd, budget: Budget) -> Next {
    if let Some(sig) = end.signal {
        return Next::Stop(Verdict::Signaled(sig));
    }
    match &end.membership {
        Some(MembershipChange::Lost { nodes, remaining }) if *remaining < budget.min_nodes => {
            return Next::Stop(Verdict::NodesLost {
                nodes: nodes.clone(),
                remaining: *remaining,
                min_nodes: budget.min_nodes,
            });
        }
        // Workers here that failed as their peers vanished failed because of it (a torn
        // connection): the change is the cause, and it uses no restart.
        Some(_) => return Next::Restart { counted: false },
        None => {}
    }
    if end.local_failure || end.remote_failure.is_some() {
        if budget.restarts_done < budget.max_restarts {
            return Next::Restart { counted: true };
        }
        return Next::Stop(match (&end.remote_failure, end.local_failure) {
            (Some(summary), false) => Verdict::FailedElsewhere(summary.clone()),
            _ => Verdict::Failed,
        });
    }
    Next::Stop(Verdict::Succeeded)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_LEFT: Budget = Budget {
        restarts_done: 2,
        max_restarts: 3,
        min_nodes: 2,
    };
    const NONE_LEFT: Budget = Budget {
        restarts_done: 3,
        ..ONE_LEFT
    };

    fn lost(remaining: u32) -> Option<MembershipChange> {
        Some(MembershipChange::Lost {
            nodes: vec!["host-b".into()],
            remaining,
        })
    }

    #[test]
    fn a_clean_attempt_succeeds_whatever_the_budget() {
        for budget in [ONE_LEFT, NONE_LEFT] {
            assert_eq!(
                next(&AttemptEnd::default(), budget),
                Next::Stop(Verdict::Succeeded)
            );
        }
    }

    #[test]
    fn failures_here_or_elsewhere_use_a_restart_and_fail_without_one() {
        let here = AttemptEnd {
            local_failure: true,
            ..AttemptEnd::default()
        };
        let elsewhere = AttemptEnd {
            remote_failure: Some("rank 3 exited with code 1".into()),
            ..AttemptEnd::default()
        };
        for end in [&here, &elsewhere] {
            assert_eq!(next(end, ONE_LEFT), Next::Restart { counted: true });
        }
        assert_eq!(next(&here, NONE_LEFT), Next::Stop(Verdict::Failed));
        assert_eq!(
            next(&elsewhere, NONE_LEFT),
            Next::Stop(Verdict::FailedElsewhere("rank 3 exited with code 1".into()))
        );
        // Both at once: this node's own failure is the one reported.
        let both = AttemptEnd {
            local_failure: true,
            ..elsewhere.clone()
        };
        assert_eq!(next(&both, NONE_LEFT), Next::Stop(Verdict::Failed));
    }

    #[test]
    fn a_signal_wins_over_everything() {
        let end = AttemptEnd {
            signal: Some(Signal::SIGTERM),
            local_failure: true,
            remote_failure: Some("x".into()),
            membership: Some(MembershipChange::ScaleUp),
        };
        assert_eq!(
            next(&end, ONE_LEFT),
            Next::Stop(Verdict::Signaled(Signal::SIGTERM))
        );
    }

    #[test]
    fn membership_changes_restart_uncounted_unless_too_few_nodes_remain() {
        let end = |membership| AttemptEnd {
            membership,
            ..AttemptEnd::default()
        };
        for budget in [ONE_LEFT, NONE_LEFT] {
            assert_eq!(
                next(&end(Some(MembershipChange::ScaleUp)), budget),
                Next::Restart { counted: false }
            );
            assert_eq!(
                next(&end(lost(2)), budget),
                Next::Restart { counted: false }
            );
        }
        assert_eq!(
            next(&end(lost(1)), ONE_LEFT),
            Next::Stop(Verdict::NodesLost {
                nodes: vec!["host-b".into()],
                remaining: 1,
                min_nodes: 2
            })
        );
    }

    #[test]
    fn a_failure_while_peers_vanish_is_blamed_on_the_loss_not_counted() {
        let end = AttemptEnd {
            local_failure: true,
            membership: lost(2),
            ..AttemptEnd::default()
        };
        for budget in [ONE_LEFT, NONE_LEFT] {
            assert_eq!(next(&end, budget), Next::Restart { counted: false });
        }
        let too_few = AttemptEnd {
            membership: lost(1),
            ..end
        };
        assert!(matches!(
            next(&too_few, ONE_LEFT),
            Next::Stop(Verdict::NodesLost { .. })
        ));
    }
}
