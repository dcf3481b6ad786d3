//! The store client: torch's TCPStore client, in tokio.
//!
//! Keys are namespaced as torch's client namespaces them (`/<key>`), so a key set here is the
//! key a `torch.distributed.TCPStore` client reads. [`StoreClient::prefixed`] adds a further
//! prefix (gloo's and torch's `PrefixStore`): `<prefix>/<key>`.
//!
//! # Errors
//! Every call is bounded by the client's timeout; a store that does not answer in time is a
//! [`StoreError::Timeout`], a broken connection a [`StoreError::Io`] naming the store.

use std::time::Duration;

use tokio::io::{AsyncReadExt, BufStream};
use tokio::net::TcpStream;

use super::wire::{self, Op};
use super::StoreError;

/// A connection to a store server.
#[derive(Debug)]
pub struct StoreClient {
    stream: BufStream<TcpStream>,
    addr: String,
    prefix: String,
    timeout: Duration,
}

impl StoreClient {
    /// Connects to `host:port`, retrying refused connections until `timeout` (the server may
    /// not be up yet), then makes torch's handshake.
    ///
    /// # Errors
    /// [`StoreError::Connect`] naming the address and the last reason, once `timeout` passes.
    pub async fn connect(host: &str, port: u16, timeout: Duration) -> Result<Self, StoreError> {
        let addr = format_addr(host, port);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut backoff = Duration::from_millis(10);
        let stream = loop {
            let attempt = tokio::time::timeout_at(deadline, TcpStream::connect((host, port))).await;
            match attempt {
                Ok(Ok(stream)) => break stream,
                Ok(Err(e)) if tokio::time::Instant::now() + backoff < deadline => {
                    tracing::debug!("store {addr} not reachable yet ({e}); retrying");
                    // Back off between connection attempts to a store that is not up yet.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Ok(Err(e)) => {
                    return Err(StoreError::Connect {
                        addr,
                        timeout,
                        reason: e.to_string(),
                    })
                }
                Err(_) => {
                    return Err(StoreError::Connect {
                        addr,
                        timeout,
                        reason: "connection attempt timed out".into(),
                    })
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let mut client = Self {
            stream: BufStream::new(stream),
            addr,
            prefix: "/".into(),
            timeout,
        };
        let nonce = std::process::id();
        let mut buf = vec![Op::Validate as u8];
        buf.extend_from_slice(&wire::MAGIC.to_le_bytes());
        buf.push(Op::Ping as u8);
        buf.extend_from_slice(&nonce.to_le_bytes());
        let echoed = client
            .call(&buf, |s| Box::pin(async move { s.read_u32_le().await }))
            .await?;
        if echoed != nonce {
            return Err(StoreError::Protocol {
                addr: client.addr,
                what: "the handshake's ping was not echoed".into(),
            });
        }
        Ok(client)
    }

    /// This client with keys namespaced under `prefix` (torch's `PrefixStore(prefix, store)`).
    pub fn prefixed(mut self, prefix: &str) -> Self {
        self.prefix = format!("{}{prefix}/", self.prefix);
        self
    }

    /// The namespace this client's keys live in, as the server sees it (e.g. `/run1/`).
    pub fn namespace(&self) -> &str {
        &self.prefix
    }

    /// Changes the timeout that bounds every call (and `get`'s wait).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// This end's address of the store connection: an address of the interface that reaches
    /// the store's host.
    ///
    /// # Errors
    /// The socket's address cannot be read.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.stream.get_ref().local_addr()
    }

    /// The address of the store.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Sets `key` to `value`.
    ///
    /// # Errors
    /// I/O or timeout.
    pub async fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut buf = vec![Op::Set as u8];
        wire::put_bytes(&mut buf, self.key(key).as_bytes());
        wire::put_bytes(&mut buf, value);
        self.write(&buf).await
    }

    /// The value of `key`, waiting (up to the client's timeout) for it to be set.
    ///
    /// # Errors
    /// [`StoreError::Timeout`] when the key does not appear in time.
    pub async fn get(&mut self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.wait(&[key], self.timeout).await?;
        let mut buf = vec![Op::Get as u8];
        wire::put_bytes(&mut buf, self.key(key).as_bytes());
        self.call(&buf, |s| Box::pin(wire::read_bytes(s, wire::MAX_VALUE_LEN)))
            .await
    }

    /// Adds `delta` to the integer at `key` (0 when missing); returns the new value.
    ///
    /// # Errors
    /// I/O or timeout (the server drops a client that adds to a non-integer).
    pub async fn add(&mut self, key: &str, delta: i64) -> Result<i64, StoreError> {
        let mut buf = vec![Op::Add as u8];
        wire::put_bytes(&mut buf, self.key(key).as_bytes());
        buf.extend_from_slice(&delta.to_le_bytes());
        self.call(&buf, |s| Box::pin(async move { s.read_i64_le().await }))
            .await
    }

    /// Sets `key` to `desired` if it holds `expected` (or is missing and `expected` is empty);
    /// returns the value after the operation.
    ///
    /// # Errors
    /// I/O or timeout.
    pub async fn compare_set(
        &mut self,
        key: &str,
        expected: &[u8],
        desired: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let mut buf = vec![Op::CompareSet as u8];
        wire::put_bytes(&mut buf, self.key(key).as_bytes());
        wire::put_bytes(&mut buf, expected);
        wire::put_bytes(&mut buf, desired);
        self.call(&buf, |s| Box::pin(wire::read_bytes(s, wire::MAX_VALUE_LEN)))
            .await
    }

    /// Whether every key exists, without waiting.
    ///
    /// # Errors
    /// I/O or timeout.
    pub async fn check(&mut self, keys: &[&str]) -> Result<bool, StoreError> {
        let buf = self.keys_request(Op::Check, keys);
        Ok(self
            .call(&buf, |s| Box::pin(async move { s.read_u8().await }))
            .await?
            == wire::CHECK_READY)
    }

    /// Waits until every key exists, at most `timeout`; then cancels the wait on the server.
    ///
    /// # Errors
    /// [`StoreError::Timeout`] naming the keys.
    pub async fn wait(&mut self, keys: &[&str], timeout: Duration) -> Result<(), StoreError> {
        let buf = self.keys_request(Op::Wait, keys);
        self.write(&buf).await?;
        match tokio::time::timeout(timeout, self.stream.read_u8()).await {
            Ok(Ok(wire::STOP_WAITING)) => Ok(()),
            Ok(Ok(other)) => Err(self.protocol(format!("WAIT answered {other}"))),
            Ok(Err(e)) => Err(self.io(e)),
            Err(_) => {
                self.write(&[Op::CancelWait as u8]).await?;
                // The keys may have arrived just before the cancel: skip that answer.
                let mut answer = self.read_u8().await?;
                if answer == wire::STOP_WAITING {
                    answer = self.read_u8().await?;
                }
                if answer != wire::WAIT_CANCELED {
                    return Err(self.protocol(format!("CANCEL_WAIT answered {answer}")));
                }
                Err(StoreError::Timeout {
                    addr: self.addr.clone(),
                    what: format!(
                        "keys {:?}",
                        keys.iter().map(|k| self.key(k)).collect::<Vec<_>>()
                    ),
                    after: timeout,
                })
            }
        }
    }

    /// The number of keys in the whole store.
    ///
    /// # Errors
    /// I/O or timeout.
    pub async fn num_keys(&mut self) -> Result<i64, StoreError> {
        self.call(&[Op::NumKeys as u8], |s| {
            Box::pin(async move { s.read_i64_le().await })
        })
        .await
    }

    /// Deletes `key`; whether it existed.
    ///
    /// # Errors
    /// I/O or timeout.
    pub async fn delete_key(&mut self, key: &str) -> Result<bool, StoreError> {
        let mut buf = vec![Op::DeleteKey as u8];
        wire::put_bytes(&mut buf, self.key(key).as_bytes());
        Ok(self
            .call(&buf, |s| Box::pin(async move { s.read_i64_le().await }))
            .await?
            > 0)
    }

    /// Appends `value` to `key` (creating it).
    ///
    /// # Errors
    /// I/O or timeout.
    pub async fn append(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut buf = vec![Op::Append as u8];
        wire::put_bytes(&mut buf, self.key(key).as_bytes());
        wire::put_bytes(&mut buf, value);
        self.write(&buf).await
    }

    /// The values of `keys`, waiting for all of them (torch's `multi_get`).
    ///
    /// # Errors
    /// [`StoreError::Timeout`] when a key does not appear in time.
    pub async fn multi_get(&mut self, keys: &[&str]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.wait(keys, self.timeout).await?;
        let buf = self.keys_request(Op::MultiGet, keys);
        let n = keys.len();
        self.call(&buf, move |s| {
            Box::pin(async move {
                let mut values = Vec::with_capacity(n);
                for _ in 0..n {
                    values.push(wire::read_bytes(s, wire::MAX_VALUE_LEN).await?);
                }
                Ok(values)
            })
        })
        .await
    }

    /// Sets several keys at once.
    ///
    /// # Errors
    /// I/O or timeout.
    pub async fn multi_set(&mut self, pairs: &[(&str, &[u8])]) -> Result<(), StoreError> {
        let mut buf = vec![Op::MultiSet as u8];
        buf.extend_from_slice(&(pairs.len() as u64).to_le_bytes());
        for (key, value) in pairs {
            wire::put_bytes(&mut buf, self.key(key).as_bytes());
            wire::put_bytes(&mut buf, value);
        }
        self.write(&buf).await
    }

    fn keys_request(&self, op: Op, keys: &[&str]) -> Vec<u8> {
        let mut buf = vec![op as u8];
        buf.extend_from_slice(&(keys.len() as u64).to_le_bytes());
        for key in keys {
            wire::put_bytes(&mut buf, self.key(key).as_bytes());
        }
        buf
    }

    async fn write(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        match tokio::time::timeout(self.timeout, wire::send(&mut self.stream, buf)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.io(e)),
            Err(_) => Err(self.timed_out("sending a request")),
        }
    }

    async fn read_u8(&mut self) -> Result<u8, StoreError> {
        self.call(&[], |s| Box::pin(async move { s.read_u8().await }))
            .await
    }

    /// Sends `buf` (if any) and reads the answer with `read`, within the timeout.
    async fn call<T>(
        &mut self,
        buf: &[u8],
        read: impl for<'a> FnOnce(&'a mut BufStream<TcpStream>) -> ReadFuture<'a, T>,
    ) -> Result<T, StoreError> {
        // One deadline for the request and its answer: one timer per call, not two.
        let stream = &mut self.stream;
        let exchange = async move {
            if !buf.is_empty() {
                wire::send(stream, buf).await?;
            }
            read(stream).await
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.io(e)),
            Err(_) => Err(self.timed_out("waiting for an answer")),
        }
    }

    fn io(&self, e: std::io::Error) -> StoreError {
        StoreError::Io {
            addr: self.addr.clone(),
            source: e,
        }
    }

    fn protocol(&self, what: String) -> StoreError {
        StoreError::Protocol {
            addr: self.addr.clone(),
            what,
        }
    }

    fn timed_out(&self, what: &str) -> StoreError {
        StoreError::Timeout {
            addr: self.addr.clone(),
            what: what.to_owned(),
            after: self.timeout,
        }
    }
}

type ReadFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<T>> + Send + 'a>>;

/// `host:port`, with IPv6 hosts in brackets.
pub fn format_addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
