//! Shared memory to the ranks on this host, TCP to the others, in one communicator.

use std::time::Duration;

use super::shm::ShmTransport;
use super::tcp::TcpTransport;
use super::{Label, Transport, TransportError};

/// A rank's links when the job spans hosts with several ranks each: every pair of ranks uses
/// one transport, shared memory when both are on this host, TCP otherwise, so messages between
/// two ranks keep their order.
#[derive(Debug)]
pub struct Mixed {
    /// `local[r]`: rank `r` shares this host (and shared memory) with this rank.
    local: Vec<bool>,
    shm: ShmTransport,
    tcp: TcpTransport,
}

impl Mixed {
    /// Combines a shared-memory group of this host's ranks with a TCP mesh of all ranks.
    pub fn new(shm: ShmTransport, tcp: TcpTransport, local: Vec<bool>) -> Self {
        Self { local, shm, tcp }
    }

    fn pick(&self, peer: usize) -> &dyn Transport {
        if self.local.get(peer).copied().unwrap_or(false) {
            &self.shm
        } else {
            &self.tcp
        }
    }
}

impl Transport for Mixed {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }

    fn size(&self) -> usize {
        self.tcp.size()
    }

    fn exchange(
        &self,
        label: Label,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        let sender = send
            .as_ref()
            .map(|(p, _)| self.local.get(*p).copied().unwrap_or(false));
        let receiver = recv
            .as_ref()
            .map(|(p, _)| self.local.get(*p).copied().unwrap_or(false));
        match (send, recv) {
            (Some(s), Some(r)) if sender != receiver => {
                // Two transports at once (a ring step across a host boundary): each moves its
                // half on a thread of its own, so neither waits on the other.
                let (to, from) = (self.pick(s.0), self.pick(r.0));
                std::thread::scope(|scope| {
                    let sending = scope.spawn(|| to.exchange(label, Some(s), None, deadline));
                    let received = from.exchange(label, None, Some(r), deadline);
                    let sent = sending.join().unwrap_or_else(|_| {
                        Err(TransportError::Broken {
                            peer: s.0,
                            reason: "the sending thread panicked".into(),
                        })
                    });
                    received.and(sent)
                })
            }
            (Some(s), r) => self.pick(s.0).exchange(label, Some(s), r, deadline),
            (None, Some(r)) => self.pick(r.0).exchange(label, None, Some(r), deadline),
            (None, None) => Ok(()),
        }
    }
}
