//! Frames on a byte stream, read in one place for every stream transport (TCP sockets,
//! shared-memory rings).
//!
//! A frame is a header — the [`Envelope`] (tag and 16 opaque bytes) and the payload's length —
//! then the payload. A receive awaits one tag from one peer: the frame with that tag lands in
//! the receive's buffer (or is folded as it arrives); frames with other tags are kept in the
//! peer's [`Inbox`] for their own receive. The transport gives no meaning to tags or to the
//! opaque bytes: the receive's [`Screen`], written by the communicator, judges every header.
//!
//! # Trust
//! Nothing from the peer is trusted. A declared length is checked before a byte is allocated:
//! the awaited frame must have exactly the expected size (it goes into the caller's buffer);
//! a frame kept for later must fit the inbox's cap ([`MAX_KEPT`] bytes per peer), and its
//! buffer grows only as its bytes arrive, [`GROWTH`] at a time. A receive abandoned in the
//! middle of a frame marks the inbox broken, so the next receive reports that instead of reading
//! payload bytes as a header.

use std::collections::{HashMap, VecDeque};

use super::TransportError;

/// Opaque bytes every frame carries beside its tag.
pub const META: usize = 16;

/// What a message carries besides its bytes. Transports match receives by `tag` alone and hand
/// every header to the receive's [`Screen`]; `meta` is for the layer above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Envelope {
    /// Receives match on it.
    pub tag: u64,
    /// Carried as it is.
    pub meta: [u8; META],
}

/// A receive's judgement of each frame header from its peer: `true` admits it (the awaited tag
/// is taken, another is kept for later), `false` refuses it, ending the receive with
/// [`TransportError::Refused`].
pub type Screen<'a> = &'a (dyn Fn(&Envelope) -> bool + Sync);

/// Bytes of a frame header: tag, payload length, meta.
pub(crate) const FRAME_HEADER: usize = 16 + META;

/// Most bytes of frames kept for later, per peer: past it the peer is sending far ahead of
/// what this rank asks for, and the link is reported broken rather than memory exhausted.
pub const MAX_KEPT: usize = 1 << 30;

/// A kept frame's buffer grows by at most this much beyond the bytes that arrived.
pub(crate) const GROWTH: usize = 1 << 20;

/// The header of a frame of `len` payload bytes.
pub(crate) fn encode(envelope: &Envelope, len: usize) -> [u8; FRAME_HEADER] {
    let mut h = [0u8; FRAME_HEADER];
    h[..8].copy_from_slice(&envelope.tag.to_le_bytes());
    h[8..16].copy_from_slice(&(len as u64).to_le_bytes());
    h[16..].copy_from_slice(&envelope.meta);
    h
}

/// A header's envelope and declared payload length (unchecked: a peer wrote it).
pub(crate) fn decode(h: &[u8; FRAME_HEADER]) -> (Envelope, u64) {
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let mut meta = [0u8; META];
    meta.copy_from_slice(&h[16..]);
    (Envelope { tag: word(0), meta }, word(8))
}

/// Where a peer's bytes come from: a socket, a ring. Neither call waits.
pub(crate) trait Source {
    /// Copies what has arrived, up to `out.len()` bytes, into `out`: how many (0: none yet).
    ///
    /// # Errors
    /// The link is broken.
    fn read(&mut self, out: &mut [u8]) -> Result<usize, TransportError>;

    /// Hands what has arrived, up to `scratch.len()` bytes, to `fold` in pieces, in order:
    /// how many. Sources that cannot lend their memory read into `scratch` first.
    ///
    /// # Errors
    /// As [`Source::read`].
    fn fold(
        &mut self,
        scratch: &mut [u8],
        fold: &mut dyn FnMut(&[u8]),
    ) -> Result<usize, TransportError> {
        let n = self.read(scratch)?;
        fold(&scratch[..n]);
        Ok(n)
    }
}

/// Frames from one peer that arrived before the receive that wants them.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    kept: HashMap<u64, VecDeque<(Envelope, Vec<u8>)>>,
    /// Bytes of `kept`, and of the frame being read into it.
    kept_bytes: usize,
    /// Why the stream from this peer can no longer be read.
    broken: Option<String>,
}

impl Inbox {
    /// Whether the stream is still readable (`Err` naming why not).
    pub(crate) fn check(&self, peer: usize) -> Result<(), TransportError> {
        match &self.broken {
            Some(reason) => Err(TransportError::Broken {
                peer,
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Marks the stream unreadable.
    pub(crate) fn break_with(&mut self, reason: String) {
        self.broken.get_or_insert(reason);
    }

    fn reserve(&mut self, peer: usize, len: u64) -> Result<usize, TransportError> {
        let room = MAX_KEPT - self.kept_bytes;
        match usize::try_from(len) {
            Ok(len) if len <= room => {
                self.kept_bytes += len;
                Ok(len)
            }
            _ => Err(TransportError::Broken {
                peer,
                reason: format!(
                    "it sent a frame of {len} bytes for a message not asked for yet, with {} bytes \
                     already waiting (at most {MAX_KEPT} may wait): it runs far ahead of this rank, \
                     or is not a ferrun peer",
                    self.kept_bytes
                ),
            }),
        }
    }

    fn keep(&mut self, envelope: Envelope, payload: Vec<u8>) {
        self.kept
            .entry(envelope.tag)
            .or_default()
            .push_back((envelope, payload));
    }

    fn take(&mut self, tag: u64) -> Option<(Envelope, Vec<u8>)> {
        let queue = self.kept.get_mut(&tag)?;
        let frame = queue.pop_front();
        if queue.is_empty() {
            self.kept.remove(&tag);
        }
        if let Some((_, payload)) = &frame {
            self.kept_bytes -= payload.len();
        }
        frame
    }
}

/// Where the awaited frame's payload goes.
pub(crate) enum Target<'a> {
    /// Into a buffer of the expected length.
    Buffer(&'a mut [u8]),
    /// To a fold, piece by piece; `scratch` has the expected length.
    Fold {
        scratch: &'a mut [u8],
        fold: &'a mut dyn FnMut(&[u8]),
    },
}

impl Target<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Buffer(out) => out.len(),
            Self::Fold { scratch, .. } => scratch.len(),
        }
    }

    fn take_whole(&mut self, payload: &[u8]) {
        match self {
            Self::Buffer(out) => out.copy_from_slice(payload),
            Self::Fold { fold, .. } => fold(payload),
        }
    }
}

enum State {
    Header {
        bytes: [u8; FRAME_HEADER],
        got: usize,
    },
    Awaited {
        copied: usize,
    },
    Kept {
        envelope: Envelope,
        len: usize,
        buf: Vec<u8>,
    },
}

/// One receive: the awaited tag from one peer.
pub(crate) struct Receive<'s, 't> {
    /// The sender.
    pub(crate) peer: usize,
    tag: u64,
    screen: Screen<'s>,
    out: Target<'t>,
    state: State,
    done: bool,
}

impl<'s, 't> Receive<'s, 't> {
    /// A receive of the frame tagged `tag` from `peer` into `out`.
    pub(crate) fn new(peer: usize, tag: u64, screen: Screen<'s>, out: Target<'t>) -> Self {
        Self {
            peer,
            tag,
            screen,
            out,
            state: State::Header {
                bytes: [0; FRAME_HEADER],
                got: 0,
            },
            done: false,
        }
    }

    /// Whether the awaited frame is whole.
    pub(crate) fn done(&self) -> bool {
        self.done
    }

    /// Whether it stopped inside a frame (its stream cannot be read on after it is dropped).
    fn mid_frame(&self) -> bool {
        !matches!(self.state, State::Header { got: 0, .. })
    }

    /// Ends the receive; one given up inside a frame leaves the peer's stream unreadable.
    pub(crate) fn end(self, inbox: &mut Inbox) {
        if !self.done && self.mid_frame() {
            inbox.break_with(format!(
                "an earlier receive from rank {} stopped inside a frame; rebuild the communicator",
                self.peer
            ));
        }
    }

    /// Moves what `source` has now; whether anything moved.
    ///
    /// # Errors
    /// [`TransportError::Refused`] for a header the screen refuses, [`TransportError::Size`]
    /// for the awaited frame with another length, [`TransportError::Broken`] for a broken
    /// stream or a kept frame past the inbox's cap.
    pub(crate) fn poll(
        &mut self,
        source: &mut dyn Source,
        inbox: &mut Inbox,
    ) -> Result<bool, TransportError> {
        inbox.check(self.peer)?;
        let peer = self.peer;
        let mut moved = false;
        while !self.done {
            match &mut self.state {
                State::Header { bytes, got } => {
                    if *got == 0 {
                        if let Some((envelope, payload)) = inbox.take(self.tag) {
                            self.admit(&envelope, payload.len() as u64)?;
                            self.out.take_whole(&payload);
                            self.done = true;
                            return Ok(true);
                        }
                    }
                    let n = source.read(&mut bytes[*got..])?;
                    if n == 0 {
                        break;
                    }
                    moved = true;
                    *got += n;
                    if *got < FRAME_HEADER {
                        continue;
                    }
                    let (envelope, len) = decode(bytes);
                    // From here the header is consumed: a refusal leaves the stream mid-frame.
                    self.state = State::Awaited { copied: 0 };
                    if envelope.tag == self.tag {
                        self.admit(&envelope, len)?;
                    } else {
                        if !(self.screen)(&envelope) {
                            return Err(TransportError::Refused { peer, envelope });
                        }
                        let len = inbox.reserve(peer, len)?;
                        self.state = State::Kept {
                            envelope,
                            len,
                            buf: Vec::new(),
                        };
                    }
                }
                State::Awaited { copied } => {
                    let want = self.out.len() - *copied;
                    let n = match &mut self.out {
                        _ if want == 0 => 0,
                        Target::Buffer(out) => source.read(&mut out[*copied..])?,
                        Target::Fold { scratch, fold } => {
                            source.fold(&mut scratch[*copied..], &mut **fold)?
                        }
                    };
                    *copied += n;
                    moved |= n > 0;
                    if *copied == self.out.len() {
                        self.reset();
                        self.done = true;
                    } else if n == 0 {
                        break;
                    }
                }
                State::Kept { envelope, len, buf } => {
                    let at = buf.len();
                    if at < *len {
                        buf.resize(at + (*len - at).min(GROWTH), 0);
                        let n = source.read(&mut buf[at..])?;
                        buf.truncate(at + n);
                        if n == 0 {
                            break;
                        }
                        moved = true;
                        continue;
                    }
                    let (envelope, buf) = (*envelope, std::mem::take(buf));
                    // Its bytes were counted when it was reserved.
                    inbox.keep(envelope, buf);
                    self.reset();
                }
            }
        }
        Ok(moved || self.done)
    }

    fn reset(&mut self) {
        self.state = State::Header {
            bytes: [0; FRAME_HEADER],
            got: 0,
        };
    }

    /// Checks the awaited tag's header: the screen, then the size.
    fn admit(&self, envelope: &Envelope, len: u64) -> Result<(), TransportError> {
        if !(self.screen)(envelope) {
            return Err(TransportError::Refused {
                peer: self.peer,
                envelope: *envelope,
            });
        }
        let expected = self.out.len();
        if len != expected as u64 {
            return Err(TransportError::Size {
                peer: self.peer,
                expected,
                got: len,
            });
        }
        Ok(())
    }
}

/// One send: a header then its payload, written as the sink takes them.
#[derive(Debug)]
pub(crate) struct Send<'a> {
    /// The receiver.
    pub(crate) peer: usize,
    pub(crate) header: [u8; FRAME_HEADER],
    pub(crate) payload: &'a [u8],
    /// Bytes of header and payload written so far.
    pub(crate) written: usize,
}

impl<'a> Send<'a> {
    /// A frame for `peer`.
    pub(crate) fn new(peer: usize, envelope: &Envelope, payload: &'a [u8]) -> Self {
        Self {
            peer,
            header: encode(envelope, payload.len()),
            payload,
            written: 0,
        }
    }

    /// Whether the whole frame is written.
    pub(crate) fn done(&self) -> bool {
        self.written == FRAME_HEADER + self.payload.len()
    }

    /// Whether it stopped inside the frame.
    pub(crate) fn mid_frame(&self) -> bool {
        self.written > 0 && !self.done()
    }

    /// The unwritten bytes, as up to two pieces (header rest, payload rest).
    pub(crate) fn rest(&self) -> [&[u8]; 2] {
        if self.written < FRAME_HEADER {
            [&self.header[self.written..], self.payload]
        } else {
            [&[], &self.payload[self.written - FRAME_HEADER..]]
        }
    }
}

#[cfg(test)]
mod tests;
