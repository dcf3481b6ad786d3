//! The frame reader on streams cut anywhere, honest and hostile.

use proptest::prelude::*;

use super::*;

/// A stream that hands out its bytes in the given cuts (a cut of 0: nothing has arrived yet),
/// then reports the link closed.
struct Cut {
    data: Vec<u8>,
    at: usize,
    cuts: Vec<usize>,
    next: usize,
}

impl Cut {
    fn new(data: Vec<u8>, mut cuts: Vec<usize>) -> Self {
        if !cuts.is_empty() && cuts.iter().all(|&c| c == 0) {
            cuts.push(1); // Bytes arrive eventually.
        }
        Self {
            data,
            at: 0,
            cuts,
            next: 0,
        }
    }
}

impl Source for Cut {
    fn read(&mut self, out: &mut [u8]) -> Result<usize, TransportError> {
        if self.at == self.data.len() {
            return Err(TransportError::Broken {
                peer: 7,
                reason: "closed".into(),
            });
        }
        let cut = if self.cuts.is_empty() {
            usize::MAX
        } else {
            self.cuts[self.next % self.cuts.len()]
        };
        self.next += 1;
        let n = cut.min(out.len()).min(self.data.len() - self.at);
        out[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn envelope(tag: u64) -> Envelope {
    Envelope {
        tag,
        meta: [tag as u8; META],
    }
}

fn frame(tag: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = encode(&envelope(tag), payload.len()).to_vec();
    out.extend_from_slice(payload);
    out
}

/// Receives `tag` (`len` bytes) until done or failed; the payload.
fn receive(
    source: &mut Cut,
    inbox: &mut Inbox,
    tag: u64,
    len: usize,
    screen: Screen<'_>,
) -> Result<Vec<u8>, TransportError> {
    let mut out = vec![0u8; len];
    let mut r = Receive::new(7, tag, screen, Target::Buffer(&mut out));
    let result = loop {
        match r.poll(source, inbox) {
            Ok(_) if r.done() => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(e),
        }
        assert!(inbox.kept_bytes <= MAX_KEPT);
        if let State::Kept { buf, .. } = &r.state {
            assert!(
                buf.capacity() <= source.at + GROWTH,
                "allocated ahead of the bytes"
            );
        }
    };
    r.end(inbox);
    result.map(|()| out)
}

#[test]
fn frames_of_other_tags_wait_for_their_own_receive() {
    let mut bytes = frame(2, b"second");
    bytes.extend(frame(1, b"first"));
    bytes.extend(frame(3, b""));
    for cut in [1, 3, 7, 32, 1000] {
        let mut source = Cut::new(bytes.clone(), vec![cut, 0]);
        let mut inbox = Inbox::default();
        let all = |_: &Envelope| true;
        assert_eq!(
            receive(&mut source, &mut inbox, 1, 5, &all).expect("1"),
            b"first"
        );
        assert_eq!(
            receive(&mut source, &mut inbox, 3, 0, &all).expect("3"),
            b""
        );
        assert_eq!(
            receive(&mut source, &mut inbox, 2, 6, &all).expect("2"),
            b"second"
        );
        assert_eq!(inbox.kept_bytes, 0);
    }
}

#[test]
fn the_awaited_frame_with_another_size_is_named_and_breaks_the_stream() {
    let mut source = Cut::new(frame(1, b"abc"), vec![]);
    let mut inbox = Inbox::default();
    let err = receive(&mut source, &mut inbox, 1, 4, &|_| true).expect_err("size");
    assert_eq!(
        err,
        TransportError::Size {
            peer: 7,
            expected: 4,
            got: 3
        }
    );
    let again = receive(&mut source, &mut inbox, 1, 3, &|_| true).expect_err("broken");
    assert!(
        again.to_string().contains("stopped inside a frame"),
        "{again}"
    );
}

#[test]
fn a_refused_header_ends_the_receive_with_its_envelope() {
    let mut source = Cut::new(frame(9, b"xy"), vec![5]);
    let mut inbox = Inbox::default();
    let err = receive(&mut source, &mut inbox, 1, 2, &|e| e.tag != 9).expect_err("refused");
    assert_eq!(
        err,
        TransportError::Refused {
            peer: 7,
            envelope: envelope(9)
        }
    );
}

#[test]
fn a_huge_declared_length_allocates_nothing_and_names_the_peer() {
    for declared in [u64::MAX, (MAX_KEPT as u64) + 1, 1 << 40] {
        let mut bytes = encode(&envelope(5), 0).to_vec();
        bytes[8..16].copy_from_slice(&declared.to_le_bytes());
        let mut source = Cut::new(bytes, vec![]);
        let mut inbox = Inbox::default();
        let err = receive(&mut source, &mut inbox, 1, 8, &|_| true).expect_err("cap");
        assert!(
            err.to_string().contains("not asked for yet") && err.to_string().contains("rank 7"),
            "{err}"
        );
        assert_eq!(inbox.kept_bytes, 0);
    }
}

#[test]
fn a_frame_within_the_cap_grows_only_as_its_bytes_arrive() {
    // It declares 512 MiB and sends 3 bytes, then closes: at most GROWTH was ever allocated.
    let mut bytes = encode(&envelope(5), 0).to_vec();
    bytes[8..16].copy_from_slice(&(512u64 << 20).to_le_bytes());
    bytes.extend_from_slice(b"abc");
    let mut source = Cut::new(bytes, vec![]);
    let mut inbox = Inbox::default();
    let err = receive(&mut source, &mut inbox, 1, 8, &|_| true).expect_err("closed");
    assert!(err.to_string().contains("closed"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary bytes cut anywhere: no panic, no allocation past the caps, and the receive
    /// ends (done, or an error).
    #[test]
    fn arbitrary_streams_never_panic(
        data in proptest::collection::vec(any::<u8>(), 0..2048),
        cuts in proptest::collection::vec(0usize..64, 0..8),
        tag in 0u64..4,
        len in 0usize..64,
    ) {
        let mut source = Cut::new(data, cuts);
        let mut inbox = Inbox::default();
        let screen = |e: &Envelope| e.meta[0] != 0xff;
        let _ = receive(&mut source, &mut inbox, tag, len, &screen);
    }

    /// Honest frames (several tags, any sizes) cut anywhere: every receive gets its own
    /// payload, in the order sent per tag, whatever order the receives come in.
    #[test]
    fn honest_frames_cut_anywhere_arrive_whole(
        frames in proptest::collection::vec((0u64..4, proptest::collection::vec(any::<u8>(), 0..300)), 1..12),
        cuts in proptest::collection::vec(0usize..80, 1..8),
        reversed in any::<bool>(),
    ) {
        let bytes: Vec<u8> = frames.iter().flat_map(|(t, p)| frame(*t, p)).collect();
        let mut source = Cut::new(bytes, cuts);
        let mut inbox = Inbox::default();
        let mut order: Vec<usize> = (0..frames.len()).collect();
        if reversed {
            // Receive each tag's frames in order, but the tags last-first.
            order.sort_by_key(|&i| std::cmp::Reverse(frames[i].0));
        }
        for i in order {
            let (tag, payload) = &frames[i];
            let got = receive(&mut source, &mut inbox, *tag, payload.len(), &|_| true);
            prop_assert_eq!(got.as_ref(), Ok(payload));
        }
        prop_assert_eq!(inbox.kept_bytes, 0);
    }
}
