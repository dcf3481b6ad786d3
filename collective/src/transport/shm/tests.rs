//! A hostile peer on a real segment: it writes impossible counters and frames into the memory
//! it shares with this rank, and hands over things that are not segments.

use std::os::fd::OwnedFd;
use std::time::Duration;

use super::*;
use crate::store::{StoreClient, StoreServer};

/// Runs `f` with a client of the store at `port`, on a runtime of its own.
fn with_store<R>(port: u16, f: impl AsyncFnOnce(&mut StoreClient) -> R) -> R {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut store = StoreClient::connect("127.0.0.1", port, Duration::from_secs(10))
            .await
            .expect("store");
        f(&mut store).await
    })
}

/// Two ranks of one host, as threads: rank 0's end and rank 1's (the hostile one).
fn pair() -> (ShmTransport, ShmTransport) {
    let server = StoreServer::bind("127.0.0.1:0".parse().expect("addr")).expect("store");
    let port = server.local_addr().port();
    let ends: Vec<ShmTransport> = std::thread::scope(|s| {
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                s.spawn(move || {
                    with_store(port, async |store| {
                        ShmTransport::connect(store, rank, 2, Duration::from_secs(10))
                            .await
                            .expect("shm")
                    })
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().expect("rank")).collect()
    });
    let mut ends = ends.into_iter();
    (ends.next().expect("0"), ends.next().expect("1"))
}

const ENVELOPE: Envelope = Envelope {
    tag: 1,
    meta: [0; 16],
};

fn receive(t: &ShmTransport, len: usize) -> Result<Vec<u8>, TransportError> {
    let mut out = vec![0u8; len];
    t.exchange(
        &ENVELOPE,
        &|_| true,
        None,
        Some((1, &mut out)),
        Duration::from_secs(5),
    )
    .map(|()| out)
}

/// What the hostile rank 1 sees of the ring 1 → 0 in rank 0's segment.
fn hostile_ring(hostile: &ShmTransport) -> (&Segment, usize) {
    (&hostile.segments[0], ring_base(1))
}

#[test]
fn an_impossible_head_is_a_broken_link_naming_the_peer_not_a_crash() {
    for head in [RING as u64 + 32, 64 << 20, u64::MAX] {
        let (victim, hostile) = pair();
        let (segment, ring) = hostile_ring(&hostile);
        segment.word(ring).store(head, Ordering::Release);
        let err = receive(&victim, 8).expect_err("corrupt head");
        assert!(
            matches!(&err, TransportError::Broken { peer: 1, reason } if reason.contains("impossible ring counters")),
            "{err}"
        );
    }
}

#[test]
fn a_head_that_moves_back_is_caught() {
    let (victim, hostile) = pair();
    hostile
        .exchange(
            &ENVELOPE,
            &|_| true,
            Some((0, b"12345678")),
            None,
            Duration::from_secs(5),
        )
        .expect("send");
    assert_eq!(receive(&victim, 8).expect("honest frame"), b"12345678");
    let (segment, ring) = hostile_ring(&hostile);
    segment.word(ring).store(1, Ordering::Release);
    let err = receive(&victim, 8).expect_err("head moved back");
    assert!(
        err.to_string().contains("impossible ring counters"),
        "{err}"
    );
}

#[test]
fn an_impossible_tail_stops_the_sender_naming_the_consumer() {
    let (sender, hostile) = pair();
    // Rank 0 sends to rank 1; the hostile consumer claims to have consumed more than was sent.
    hostile.segments[1]
        .word(ring_base(0) + 64)
        .store(1 << 30, Ordering::Release);
    let err = sender
        .exchange(
            &ENVELOPE,
            &|_| true,
            Some((1, b"x")),
            None,
            Duration::from_secs(5),
        )
        .expect_err("corrupt tail");
    assert!(
        matches!(&err, TransportError::Broken { peer: 1, reason } if reason.contains("impossible ring counters")),
        "{err}"
    );
}

/// Writes raw bytes into the ring 1 → 0 as rank 1 could, and publishes them.
fn inject(hostile: &ShmTransport, bytes: &[u8]) {
    let (segment, ring) = hostile_ring(hostile);
    segment.ring_write(ring + CONTROL, RING, 0, bytes);
    segment
        .word(ring)
        .store(bytes.len() as u64, Ordering::Release);
}

#[test]
fn huge_declared_lengths_allocate_nothing_and_are_named() {
    use super::super::frame::encode;
    // For another tag: past the inbox's cap.
    let (victim, hostile) = pair();
    let mut header = encode(
        &Envelope {
            tag: 2,
            meta: [0; 16],
        },
        0,
    );
    header[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    inject(&hostile, &header);
    let err = receive(&victim, 8).expect_err("huge early frame");
    assert!(err.to_string().contains("not asked for yet"), "{err}");
    // For the awaited tag: another size than the receive's.
    let (victim, hostile) = pair();
    let mut header = encode(&ENVELOPE, 0);
    header[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    inject(&hostile, &header);
    let err = receive(&victim, 8).expect_err("wrong size");
    assert_eq!(
        err,
        TransportError::Size {
            peer: 1,
            expected: 8,
            got: 1 << 40
        }
    );
}

fn memfd(len: u64, seal: bool) -> OwnedFd {
    let fd = memfd_create(c"test", MFdFlags::MFD_ALLOW_SEALING).expect("memfd");
    let file = std::fs::File::from(fd);
    file.set_len(len).expect("size");
    if seal {
        fcntl(
            &file,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
        )
        .expect("seal");
    }
    file.into()
}

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};

#[test]
fn only_sealed_memory_files_of_the_right_size_are_mapped() {
    let len = segment_len(2);
    assert!(Segment::adopt(memfd(len as u64, true), len).is_ok());
    let short = Segment::adopt(memfd(4096, true), len).expect_err("short");
    assert!(short.contains("4096 bytes"), "{short}");
    let unsealed = Segment::adopt(memfd(len as u64, false), len).expect_err("unsealed");
    assert!(unsealed.contains("not sealed"), "{unsealed}");
    let file: OwnedFd = std::fs::File::open("/proc/self/status")
        .expect("file")
        .into();
    assert!(Segment::adopt(file, len).is_err());
}

#[test]
fn a_live_owner_holds_its_lock_and_a_dead_one_does_not() {
    let (zero, one) = pair();
    assert!(zero.segments[1].owner_alive());
    assert!(one.segments[0].owner_alive());
    // Rank 1 goes: its own segment's file, which holds the lock, is closed.
    drop(one);
    assert!(!zero.segments[1].owner_alive());
}

/// Rank 0 of 2 connecting while the test plays rank 1 through `play` (given the store).
fn connect_against(play: impl FnOnce(u16) + std::marker::Send) -> Result<ShmTransport, ShmError> {
    let server = StoreServer::bind("127.0.0.1:0".parse().expect("addr")).expect("store");
    let port = server.local_addr().port();
    std::thread::scope(|s| {
        let rank0 = s.spawn(move || {
            with_store(port, async |store| {
                ShmTransport::connect(store, 0, 2, Duration::from_secs(5)).await
            })
        });
        play(port);
        rank0.join().expect("rank 0")
    })
}

fn set_key(port: u16, key: &str, value: &[u8]) {
    with_store(port, async |store| {
        store.set(key, value).await.expect("set")
    });
}

fn get_key(port: u16, key: &str) -> String {
    with_store(port, async |store| {
        String::from_utf8(store.get(key).await.expect("get")).expect("utf-8")
    })
}

#[test]
fn a_store_value_naming_a_file_opens_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").expect("victim");
    let path = victim.display().to_string();
    let err = connect_against(|port| set_key(port, "shm/1", path.as_bytes())).expect_err("refused");
    assert!(
        err.to_string().contains("rank 1") && err.to_string().contains("no valid segment"),
        "{err}"
    );
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
}

#[test]
fn a_handout_of_something_other_than_a_segment_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, vec![0u8; segment_len(2)]).expect("victim");
    let err = connect_against(|port| {
        // A hostile rank 1: a real handout socket that hands over a writable regular file.
        let hostile = handout::Handout::listen().expect("listen");
        set_key(port, "shm/1", hostile.name().as_bytes());
        let name = get_key(port, "shm/0");
        let _asked = handout::ask(&name, 1).expect("ask rank 0");
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&victim)
            .expect("victim");
        let until = std::time::Instant::now() + Duration::from_secs(5);
        use std::os::fd::AsFd;
        hostile.serve(file.as_fd(), 1, &[0], until).expect("serve");
    })
    .expect_err("refused");
    assert!(err.to_string().contains("rank 1"), "{err}");
    assert!(std::fs::read(&victim)
        .expect("victim")
        .iter()
        .all(|&b| b == 0));
}
