//! The server's request parser, without I/O: bytes in, whole requests out.
//!
//! # Trust
//! Clients are not trusted: every length and count is checked against the protocol's limits
//! before anything is allocated, and a request whose declared fields add up to more than
//! [`MAX_REQUEST`] bytes is refused as soon as its header says so. An incomplete request
//! allocates nothing: the parser says how many bytes it needs at least, and the connection
//! buffers them as they arrive (under its memory budget).

use super::wire::{Op, MAX_KEY_COUNT, MAX_KEY_LEN, MAX_VALUE_LEN};

/// Most bytes one request may declare: two values (compare-set) and their keys.
pub const MAX_REQUEST: u64 = 2 * MAX_VALUE_LEN + 2 * MAX_KEY_LEN + 64;

/// A request as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Handshake.
    Validate {
        /// Must be [`super::wire::MAGIC`].
        magic: u32,
    },
    /// Echo.
    Ping {
        /// Echoed back.
        nonce: u32,
    },
    /// Sets a key.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
    },
    /// Sets a key if it holds `expected`.
    CompareSet {
        /// The key.
        key: String,
        /// The value expected (empty: missing).
        expected: Vec<u8>,
        /// The value to set.
        desired: Vec<u8>,
    },
    /// Reads a key.
    Get {
        /// The key.
        key: String,
    },
    /// Adds to a counter.
    Add {
        /// The key.
        key: String,
        /// The amount.
        delta: i64,
    },
    /// Whether keys exist.
    Check {
        /// The keys.
        keys: Vec<String>,
    },
    /// Waits for keys.
    Wait {
        /// The keys.
        keys: Vec<String>,
    },
    /// Cancels a pending wait.
    CancelWait,
    /// Counts keys.
    NumKeys,
    /// Deletes a key.
    DeleteKey {
        /// The key.
        key: String,
    },
    /// Appends to a key.
    Append {
        /// The key.
        key: String,
        /// What to append.
        value: Vec<u8>,
    },
    /// Reads several keys.
    MultiGet {
        /// The keys.
        keys: Vec<String>,
    },
    /// Sets several keys.
    MultiSet {
        /// Keys and values.
        pairs: Vec<(String, Vec<u8>)>,
    },
    /// Pushes onto a queue.
    QueuePush {
        /// The queue.
        key: String,
        /// The value.
        value: Vec<u8>,
    },
    /// Pops from a queue.
    QueuePop {
        /// The queue.
        key: String,
    },
    /// A queue's length.
    QueueLen {
        /// The queue.
        key: String,
    },
}

/// What [`parse`] found at the start of the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A whole request, `used` bytes long.
    Request {
        /// The request.
        request: Request,
        /// Bytes it took.
        used: usize,
    },
    /// Not whole yet: at least `need` bytes (counted from the start) are needed.
    Incomplete {
        /// Bytes needed at least.
        need: usize,
    },
}

/// Why the bytes are not a request; the connection is then dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// No such opcode.
    #[error("unknown opcode {0}")]
    UnknownOp(u8),
    /// A field longer than the protocol allows.
    #[error("a {what} of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Declared length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// More keys than the protocol allows.
    #[error("{count} keys in one request exceeds the limit of {max}")]
    TooMany {
        /// Declared count.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// The fields add up past [`MAX_REQUEST`].
    #[error("a request of at least {0} bytes exceeds the limit of {MAX_REQUEST}")]
    TooLarge(u64),
    /// A key that is not UTF-8.
    #[error("a key is not UTF-8")]
    NotUtf8,
}

/// Why parsing stopped.
enum Stop {
    Short(u64),
    Bad(WireError),
}

impl From<WireError> for Stop {
    fn from(e: WireError) -> Self {
        Self::Bad(e)
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
    /// Bytes declared so far (may run ahead of `buf`).
    declared: u64,
}

impl Cursor<'_> {
    /// Declares `n` more bytes; refuses a request past the limit.
    fn declare(&mut self, n: u64) -> Result<(), Stop> {
        self.declared = self.declared.saturating_add(n);
        if self.declared > MAX_REQUEST {
            return Err(WireError::TooLarge(self.declared).into());
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&[u8], Stop> {
        let end = self.at + n;
        if end > self.buf.len() {
            return Err(Stop::Short(end as u64));
        }
        let bytes = &self.buf[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Stop> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64, Stop> {
        self.declare(8)?;
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, Stop> {
        self.declare(4)?;
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn bytes(&mut self, what: &'static str, max: u64) -> Result<Vec<u8>, Stop> {
        let len = self.u64()?;
        if len > max {
            return Err(WireError::TooLong { what, len, max }.into());
        }
        self.declare(len)?;
        // `declare` bounds `len` far below usize::MAX.
        Ok(self.take(len as usize)?.to_vec())
    }

    fn value(&mut self) -> Result<Vec<u8>, Stop> {
        self.bytes("value", MAX_VALUE_LEN)
    }

    fn key(&mut self) -> Result<String, Stop> {
        String::from_utf8(self.bytes("key", MAX_KEY_LEN)?).map_err(|_| WireError::NotUtf8.into())
    }

    fn count(&mut self) -> Result<usize, Stop> {
        let count = self.u64()?;
        if count > MAX_KEY_COUNT {
            return Err(WireError::TooMany {
                count,
                max: MAX_KEY_COUNT,
            }
            .into());
        }
        // Each key takes at least its 8-byte length.
        let least = self.declared.saturating_add(count.saturating_mul(8));
        if least > MAX_REQUEST {
            return Err(WireError::TooLarge(least).into());
        }
        Ok(count as usize)
    }

    fn keys(&mut self) -> Result<Vec<String>, Stop> {
        let count = self.count()?;
        // Capacity from what has arrived, not from what is declared.
        let mut keys = Vec::with_capacity(count.min((self.buf.len() - self.at) / 8));
        for _ in 0..count {
            keys.push(self.key()?);
        }
        Ok(keys)
    }
}

/// Parses the request at the start of `buf`.
///
/// # Errors
/// [`WireError`] when the bytes break the protocol or its limits.
pub fn parse(buf: &[u8]) -> Result<Parsed, WireError> {
    let mut c = Cursor {
        buf,
        at: 0,
        declared: 1,
    };
    match request(&mut c) {
        Ok(request) => Ok(Parsed::Request {
            request,
            used: c.at,
        }),
        // `declare` keeps every position below MAX_REQUEST, far below usize::MAX.
        Err(Stop::Short(need)) => Ok(Parsed::Incomplete {
            need: need as usize,
        }),
        Err(Stop::Bad(e)) => Err(e),
    }
}

fn request(c: &mut Cursor<'_>) -> Result<Request, Stop> {
    let [byte] = c.array::<1>()?;
    let op = Op::from_byte(byte).ok_or(WireError::UnknownOp(byte))?;
    Ok(match op {
        Op::Validate => Request::Validate { magic: c.u32()? },
        Op::Ping => Request::Ping { nonce: c.u32()? },
        Op::Set => Request::Set {
            key: c.key()?,
            value: c.value()?,
        },
        Op::CompareSet => Request::CompareSet {
            key: c.key()?,
            expected: c.value()?,
            desired: c.value()?,
        },
        Op::Get => Request::Get { key: c.key()? },
        Op::Add => Request::Add {
            key: c.key()?,
            delta: c.u64()? as i64,
        },
        Op::Check => Request::Check { keys: c.keys()? },
        Op::Wait => Request::Wait { keys: c.keys()? },
        Op::CancelWait => Request::CancelWait,
        Op::NumKeys => Request::NumKeys,
        Op::DeleteKey => Request::DeleteKey { key: c.key()? },
        Op::Append => Request::Append {
            key: c.key()?,
            value: c.value()?,
        },
        Op::MultiGet => Request::MultiGet { keys: c.keys()? },
        Op::MultiSet => {
            let count = c.count()?;
            let mut pairs = Vec::with_capacity(count.min((c.buf.len() - c.at) / 16));
            for _ in 0..count {
                pairs.push((c.key()?, c.value()?));
            }
            Request::MultiSet { pairs }
        }
        Op::QueuePush => Request::QueuePush {
            key: c.key()?,
            value: c.value()?,
        },
        Op::QueuePop => Request::QueuePop { key: c.key()? },
        Op::QueueLen => Request::QueueLen { key: c.key()? },
    })
}

#[cfg(test)]
mod tests;
