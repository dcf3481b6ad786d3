//! Why a collective failed, as the ranks agree on it: what a refused message meant
//! (another call, a peer that gave up, a peer that lost a rank), and the root cause recorded
//! through the [`super::Witness`] — then telling the peers, so that none waits for its
//! deadline.

use std::time::Duration;

use super::label::{self, Label};
use super::{witness, Call, CommError, Communicator};
use crate::transport::{Envelope, Transport, TransportError};

/// Why a collective failed between ranks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// Moving bytes failed.
    #[error(transparent)]
    Link(#[from] TransportError),
    /// The peer called another collective than this rank at this point.
    #[error("rank {peer} called {theirs} as its collective #{their_seq} where this rank called {ours} as #{seq}: every rank must call the same collectives in the same order, with the same dtype, count, reduction and root")]
    Mismatch {
        /// The peer.
        peer: usize,
        /// This rank's collective number.
        seq: u64,
        /// What this rank called.
        ours: Call,
        /// The peer's collective number.
        their_seq: u64,
        /// What the peer called.
        theirs: Call,
    },
    /// The peer gave up on the collective because the ranks disagree.
    #[error("rank {peer} gave up on its {call}: it found that the ranks called different collectives (its error names them)")]
    Aborted {
        /// The peer.
        peer: usize,
        /// What the peer was calling.
        call: Call,
    },
    /// A rank lost its link to another, which is gone: the root cause, as the first rank to
    /// see it reported it.
    #[error("rank {lost} is gone: rank {reporter} lost its link to it during its {during}")]
    PeerLost {
        /// The rank that reported it.
        reporter: usize,
        /// The rank that is gone.
        lost: usize,
        /// What the reporter was calling.
        during: String,
    },
}

impl<T: Transport> Communicator<T> {
    /// Turns a transport failure into the op's error: what a refused message meant, and the
    /// root cause the ranks agree on. Tells the peers first why this rank gives up, so that
    /// they fail at once too, rather than at their deadline.
    pub(super) fn failed(
        &self,
        op: &'static str,
        tag: Label,
        moved: Result<(), TransportError>,
    ) -> Result<(), CommError> {
        let Err(error) = moved else { return Ok(()) };
        let me = self.members[self.rank];
        let failure = match error {
            TransportError::Refused { peer, envelope } => meaning(&tag, peer, &envelope),
            TransportError::Broken { peer, .. } => {
                let mine = witness::Record {
                    lost: peer,
                    reporter: me,
                    during: tag.call.to_string(),
                };
                match self.first_failure(&mine) {
                    Some(first) if first != mine && first.lost != me => first.into(),
                    _ => Failure::Link(error),
                }
            }
            other => Failure::Link(other),
        };
        match &failure {
            Failure::Mismatch { .. } => self.tell_peers(Label::abort(self.id, tag.call), None),
            // Passed on, so that a rank waiting on this one (not on the rank that found the
            // mismatch) hears why, rather than seeing this rank go.
            Failure::Aborted { peer, .. } => {
                self.tell_peers(Label::abort(self.id, tag.call), Some(*peer));
            }
            Failure::PeerLost {
                lost,
                reporter,
                during,
            } => {
                // Heard from a peer: record it, so that ranks that look later agree.
                let _ = self.first_failure(&witness::Record {
                    lost: *lost,
                    reporter: *reporter,
                    during: during.clone(),
                });
                self.tell_peers(Label::lost(self.id, *lost, tag.call), Some(*lost));
            }
            Failure::Link(TransportError::Broken { peer, .. }) => {
                self.tell_peers(Label::lost(self.id, *peer, tag.call), Some(*peer));
            }
            _ => {}
        }
        Err(CommError::Transport {
            op,
            rank: me,
            source: failure,
        })
    }

    /// Records `mine` as the job's first failure unless one is recorded: the first.
    fn first_failure(&self, mine: &witness::Record) -> Option<witness::Record> {
        let recorded = self.witness.as_ref()?.first(&mine.to_string())?;
        let first = witness::Record::parse(&recorded);
        if first.is_none() {
            tracing::warn!("ignored a malformed failure record in the store: {recorded:?}");
        }
        first.filter(|r| r.lost < self.transport.size() && r.reporter < self.transport.size())
    }

    /// Tells every other member (but `skip`) why this rank gives up (best effort, briefly bounded).
    fn tell_peers(&self, label: Label, skip: Option<usize>) {
        let me = self.members[self.rank];
        let envelope = label.envelope();
        for &peer in self.members.iter().filter(|&&p| p != me && Some(p) != skip) {
            let _ = self.transport.exchange(
                &envelope,
                &|_| true,
                Some((peer, &[])),
                None,
                Duration::from_secs(1),
            );
        }
    }
}

/// Whether a receive awaiting `ours` takes in a message labelled `theirs` (its own, or another
/// tag's for later), or refuses it (see [`meaning`]).
pub(super) fn admits(ours: &Label, theirs: &Envelope) -> bool {
    matches!(
        label::classify(ours, &Label::of(theirs)),
        label::Arrival::Awaited | label::Arrival::Other
    )
}

/// What a message that a receive awaiting `ours` refused says.
fn meaning(ours: &Label, peer: usize, envelope: &Envelope) -> Failure {
    let theirs = Label::of(envelope);
    match label::classify(ours, &theirs) {
        label::Arrival::Mismatch => Failure::Mismatch {
            peer,
            seq: ours.seq(),
            ours: ours.call,
            their_seq: theirs.seq(),
            theirs: theirs.call,
        },
        label::Arrival::Aborted => Failure::Aborted {
            peer,
            call: theirs.call,
        },
        label::Arrival::Lost(lost) => Failure::PeerLost {
            reporter: peer,
            lost,
            during: theirs.call.to_string(),
        },
        // A transport refuses only what the screen refused.
        label::Arrival::Awaited | label::Arrival::Other => {
            debug_assert!(false, "a transport refused an admissible message");
            Failure::Link(TransportError::Refused {
                peer,
                envelope: *envelope,
            })
        }
    }
}
