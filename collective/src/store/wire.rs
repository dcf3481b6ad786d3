//! The c10d TCPStore wire format, as torch 2.13 speaks it.
//!
//! Each request is one opcode byte and its fields; strings and byte vectors are a `u64` length
//! then the bytes; integers are raw. Everything is in host byte order, which for every platform
//! torch ships on is little-endian, so that is what ferrun writes. Probed against torch 2.13's
//! own client and server (see the store tests).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// `validationMagicNumber`: the first thing a client sends, after `VALIDATE`.
pub const MAGIC: u32 = 0x3C85_F7CE;

/// Longest key the server accepts (torch's `MAX_STRING_LEN`).
pub const MAX_KEY_LEN: u64 = 8 * 1024;
/// Largest value the server accepts. torch's libuv server takes 8 MiB; ferrun allows more so
/// that large blobs (NCCL ids, pickled objects) never fail on it.
pub const MAX_VALUE_LEN: u64 = 256 * 1024 * 1024;
/// Most keys in one request (torch's `MAX_KEY_COUNT`).
pub const MAX_KEY_COUNT: u64 = 128 * 1024;

/// Request opcodes (`c10d::detail::QueryType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Handshake: followed by [`MAGIC`].
    Validate = 0,
    /// key, value.
    Set = 1,
    /// key, expected, desired → current value.
    CompareSet = 2,
    /// key → value (empty when missing).
    Get = 3,
    /// key, i64 → new value.
    Add = 4,
    /// keys → READY / NOT_READY.
    Check = 5,
    /// keys → STOP_WAITING once all exist.
    Wait = 6,
    /// → i64.
    NumKeys = 7,
    /// key → i64 deleted.
    DeleteKey = 8,
    /// key, value.
    Append = 9,
    /// keys → values.
    MultiGet = 10,
    /// keys and values.
    MultiSet = 11,
    /// → WAIT_CANCELED (after a pending WAIT).
    CancelWait = 12,
    /// u32 nonce → the nonce.
    Ping = 13,
    /// queue, value.
    QueuePush = 14,
    /// queue → i64 length, then the value when non-empty.
    QueuePop = 15,
    /// queue → i64.
    QueueLen = 16,
}

impl Op {
    /// The opcode for a byte, if any.
    pub fn from_byte(b: u8) -> Option<Self> {
        use Op::*;
        Some(match b {
            0 => Validate,
            1 => Set,
            2 => CompareSet,
            3 => Get,
            4 => Add,
            5 => Check,
            6 => Wait,
            7 => NumKeys,
            8 => DeleteKey,
            9 => Append,
            10 => MultiGet,
            11 => MultiSet,
            12 => CancelWait,
            13 => Ping,
            14 => QueuePush,
            15 => QueuePop,
            16 => QueueLen,
            _ => return None,
        })
    }
}

/// `CheckResponseType::READY`.
pub const CHECK_READY: u8 = 0;
/// `CheckResponseType::NOT_READY`.
pub const CHECK_NOT_READY: u8 = 1;
/// `WaitResponseType::STOP_WAITING`.
pub const STOP_WAITING: u8 = 0;
/// `WaitResponseType::WAIT_CANCELED`.
pub const WAIT_CANCELED: u8 = 1;

/// A length-prefixed byte vector.
pub fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    buf.extend_from_slice(bytes);
}

/// Reads a length-prefixed byte vector of at most `max` bytes. Memory grows with the bytes
/// that arrive, not with the length declared.
///
/// # Errors
/// I/O errors, or `InvalidData` when the length exceeds `max`.
pub async fn read_bytes(r: &mut (impl AsyncRead + Unpin), max: u64) -> std::io::Result<Vec<u8>> {
    let len = r.read_u64_le().await?;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("field of {len} bytes exceeds the limit of {max}"),
        ));
    }
    let mut bytes = Vec::with_capacity(len.min(64 * 1024) as usize);
    r.take(len).read_to_end(&mut bytes).await?;
    if bytes.len() as u64 != len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(bytes)
}

/// Writes `buf` and flushes it.
///
/// # Errors
/// I/O errors.
pub async fn send(w: &mut (impl AsyncWrite + Unpin), buf: &[u8]) -> std::io::Result<()> {
    w.write_all(buf).await?;
    w.flush().await
}
