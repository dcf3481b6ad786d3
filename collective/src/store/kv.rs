//! What bootstrapping a communicator needs of a store: publish a value, read a peer's (waiting
//! for it), and know which local address reaches the store (so that TCP links listen where
//! the peers can connect). [`StoreClient`] is one; the torch backend hands torch's own store
//! (a `PrefixStore` over a TCPStore, a FileStore, …) through the same trait.
//!
//! # Trust
//! Values read back are a peer's (or anyone's who can write the store): every caller parses
//! and validates them before use.

use std::net::IpAddr;

use super::{StoreClient, StoreError};

/// A key/value store the ranks of one communicator share.
#[allow(async_fn_in_trait)] // Driven on one thread by `block_on`; no `Send` bound is needed.
pub trait KeyValue {
    /// Sets `key` to `value`.
    ///
    /// # Errors
    /// The store's, naming it.
    async fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError>;

    /// The value of `key`, waiting (up to the store's timeout) for it to be set.
    ///
    /// # Errors
    /// [`StoreError::Timeout`] when the key does not appear in time.
    async fn get(&mut self, key: &str) -> Result<Vec<u8>, StoreError>;

    /// The values of `keys`, waiting for each (one round trip where the store allows).
    ///
    /// # Errors
    /// As [`KeyValue::get`].
    async fn get_all(&mut self, keys: &[String]) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            values.push(self.get(key).await?);
        }
        Ok(values)
    }

    /// The local address from which this host reaches the store (and, so, its peers).
    ///
    /// # Errors
    /// When it cannot be found.
    fn local_ip(&self) -> std::io::Result<IpAddr>;
}

impl KeyValue for StoreClient {
    async fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        StoreClient::set(self, key, value).await
    }

    async fn get(&mut self, key: &str) -> Result<Vec<u8>, StoreError> {
        StoreClient::get(self, key).await
    }

    async fn get_all(&mut self, keys: &[String]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.multi_get(&keys.iter().map(String::as_str).collect::<Vec<_>>())
            .await
    }

    fn local_ip(&self) -> std::io::Result<IpAddr> {
        Ok(self.local_addr()?.ip())
    }
}
