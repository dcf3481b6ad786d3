//! Shared memory to the ranks on this host, TCP to the others, in one communicator.

use std::time::Duration;

use super::shm::ShmTransport;
use super::tcp::TcpTransport;
use super::{Envelope, Fold, Screen, Transport, TransportError};

/// A rank's links when the job spans hosts with several ranks each: every pair of ranks uses
/// one transport, shared memory when both are on this host, TCP otherwise, so messages between
/// two ranks keep their order.
#[derive(Debug)]
pub struct Mixed {
    /// `hosts[r]`: the host of rank `r`, numbered by the lowest rank on it.
    hosts: Vec<usize>,
    /// `local[r]`: rank `r` shares this host (and shared memory) with this rank.
    local: Vec<bool>,
    shm: ShmTransport,
    tcp: TcpTransport,
}

impl Mixed {
    /// Combines a shared-memory group of this host's ranks with a TCP mesh of all ranks;
    /// `hosts[r]` tells which ranks share a host (equal values).
    pub fn new(shm: ShmTransport, tcp: TcpTransport, hosts: &[impl PartialEq]) -> Self {
        let me = tcp.rank();
        let number = |r: usize| hosts.iter().position(|h| *h == hosts[r]).unwrap_or(r);
        Self {
            local: (0..hosts.len()).map(|r| hosts[r] == hosts[me]).collect(),
            hosts: (0..hosts.len()).map(number).collect(),
            shm,
            tcp,
        }
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

    fn host_of(&self, rank: usize) -> usize {
        self.hosts.get(rank).copied().unwrap_or(rank)
    }

    fn exchange(
        &self,
        envelope: &Envelope,
        screen: Screen<'_>,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        let from = recv.as_ref().map(|r| r.0);
        let mut recv = recv;
        self.route(envelope, screen, send, from, deadline, &mut |link, send| {
            link.exchange(envelope, screen, send, recv.take(), deadline)
        })
    }

    fn exchange_fold(
        &self,
        envelope: &Envelope,
        screen: Screen<'_>,
        send: Option<(usize, &[u8])>,
        recv: Option<Fold<'_>>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        let from = recv.as_ref().map(|r| r.peer);
        let mut recv = recv;
        self.route(envelope, screen, send, from, deadline, &mut |link, send| {
            link.exchange_fold(envelope, screen, send, recv.take(), deadline)
        })
    }
}

/// The receiving half of an exchange on one link, given the send when that link does both.
type Receive<'a> =
    dyn FnMut(&dyn Transport, Option<(usize, &[u8])>) -> Result<(), TransportError> + 'a;

impl Mixed {
    /// Runs an exchange on the links it needs: `receive` gets the receiving link and the send
    /// when one link does both.
    fn route(
        &self,
        envelope: &Envelope,
        screen: Screen<'_>,
        send: Option<(usize, &[u8])>,
        from: Option<usize>,
        deadline: Duration,
        receive: &mut Receive<'_>,
    ) -> Result<(), TransportError> {
        let is_local = |p: usize| self.local.get(p).copied().unwrap_or(false);
        match (send, from) {
            (Some(s), Some(r)) if is_local(s.0) != is_local(r) => {
                // Two transports at once (a ring step across a host boundary): each moves its
                // half on a thread of its own, so neither waits on the other.
                let to = self.pick(s.0);
                std::thread::scope(|scope| {
                    let sending =
                        scope.spawn(|| to.exchange(envelope, screen, Some(s), None, deadline));
                    let received = receive(self.pick(r), None);
                    let sent = sending.join().unwrap_or_else(|_| {
                        Err(TransportError::Broken {
                            peer: s.0,
                            reason: "the sending thread panicked".into(),
                        })
                    });
                    received.and(sent)
                })
            }
            (s, Some(r)) => receive(self.pick(r), s),
            (Some(s), None) => self
                .pick(s.0)
                .exchange(envelope, screen, Some(s), None, deadline),
            (None, None) => Ok(()),
        }
    }
}
