//! Ranks as threads of one process, exchanging through shared mailboxes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{Envelope, Screen, Transport, TransportError};

/// Per `(from, to)`: the messages in the order they were sent.
type Mailboxes = HashMap<(usize, usize), VecDeque<(Envelope, Vec<u8>)>>;

#[derive(Debug, Default)]
struct Shared {
    boxes: Mutex<Mailboxes>,
    arrived: Condvar,
}

/// One rank's end of an in-process network.
#[derive(Debug, Clone)]
pub struct MemTransport {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
    /// `hosts[r]`: the host rank `r` pretends to run on (for the host-aware algorithms).
    hosts: Option<Arc<[usize]>>,
}

impl MemTransport {
    /// An in-process network of `size` ranks; element `r` is rank `r`'s end.
    pub fn network(size: usize) -> Vec<Self> {
        let shared = Arc::new(Shared::default());
        (0..size)
            .map(|rank| Self {
                rank,
                size,
                shared: Arc::clone(&shared),
                hosts: None,
            })
            .collect()
    }

    /// As [`MemTransport::network`], rank `r` pretending to run on host `hosts[r]`.
    pub fn network_on_hosts(hosts: &[usize]) -> Vec<Self> {
        let hosts: Arc<[usize]> = hosts.into();
        let mut ranks = Self::network(hosts.len());
        for rank in &mut ranks {
            rank.hosts = Some(Arc::clone(&hosts));
        }
        ranks
    }
}

impl Transport for MemTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn host_of(&self, rank: usize) -> usize {
        self.hosts
            .as_ref()
            .and_then(|h| h.get(rank).copied())
            .unwrap_or(rank)
    }

    fn exchange(
        &self,
        envelope: &Envelope,
        screen: Screen<'_>,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        let lock = || {
            self.shared
                .boxes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some((peer, bytes)) = send {
            lock()
                .entry((self.rank, peer))
                .or_default()
                .push_back((*envelope, bytes.to_vec()));
            self.shared.arrived.notify_all();
        }
        let Some((peer, out)) = recv else {
            return Ok(());
        };
        let until = Instant::now() + deadline;
        let mut boxes = lock();
        loop {
            if let Some(queue) = boxes.get_mut(&(peer, self.rank)) {
                let mut found = None;
                for (i, (theirs, _)) in queue.iter().enumerate() {
                    if !screen(theirs) {
                        return Err(TransportError::Refused {
                            peer,
                            envelope: *theirs,
                        });
                    }
                    if theirs.tag == envelope.tag {
                        found = Some(i);
                        break;
                    }
                }
                if let Some((_, message)) = found.and_then(|i| queue.remove(i)) {
                    if message.len() != out.len() {
                        return Err(TransportError::Size {
                            peer,
                            expected: out.len(),
                            got: message.len() as u64,
                        });
                    }
                    out.copy_from_slice(&message);
                    return Ok(());
                }
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Timeout {
                    peer,
                    after: deadline,
                });
            }
            boxes = self
                .shared
                .arrived
                .wait_timeout(boxes, left)
                .map_or_else(|e| e.into_inner().0, |(b, _)| b);
        }
    }
}
