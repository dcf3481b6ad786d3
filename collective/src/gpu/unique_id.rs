//! The NCCL unique id, from rank 0 to every rank through the agent store: rank 0 makes it
//! (`ncclGetUniqueId`, which needs no GPU) and sets it; the others wait for it.
//!
//! # Trust
//! The value read from the store is checked to be exactly [`ID_BYTES`] long before NCCL sees
//! it; anything else is an error naming the key.

use crate::store::KeyValue;

use super::GpuError;

/// `sizeof(ncclUniqueId)`: `NCCL_UNIQUE_ID_BYTES`, the same in every NCCL 2.
pub const ID_BYTES: usize = 128;

/// The store key (under the communicator's prefix).
pub const KEY: &str = "nccl/unique_id";

/// Rank 0 sets the id `make` returns; every rank returns it.
///
/// # Errors
/// The store's, `make`'s, or [`GpuError::BadUniqueId`] for a value of the wrong length.
pub async fn exchange(
    store: &mut impl KeyValue,
    rank: usize,
    make: impl FnOnce() -> Result<[u8; ID_BYTES], GpuError>,
) -> Result<[u8; ID_BYTES], GpuError> {
    if rank == 0 {
        let id = make()?;
        store.set(KEY, &id).await?;
        return Ok(id);
    }
    let value = store.get(KEY).await?;
    value
        .as_slice()
        .try_into()
        .map_err(|_| GpuError::BadUniqueId {
            key: KEY,
            len: value.len(),
        })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{StoreClient, StoreServer};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn every_rank_gets_rank_zeros_id_and_a_short_value_is_refused() {
        let server = StoreServer::bind("127.0.0.1:0".parse().expect("addr")).expect("store");
        let port = server.local_addr().port();
        let rt = runtime();
        rt.block_on(async {
            let timeout = Duration::from_secs(30);
            let mut stores = Vec::new();
            for _ in 0..3 {
                let c = StoreClient::connect("127.0.0.1", port, timeout)
                    .await
                    .expect("connect");
                stores.push(c.prefixed("job"));
            }
            let made: [u8; ID_BYTES] = std::array::from_fn(|i| i as u8);
            let mut ids = Vec::new();
            for (rank, store) in stores.iter_mut().enumerate() {
                ids.push(exchange(store, rank, || Ok(made)).await.expect("exchange"));
            }
            assert!(ids.iter().all(|id| *id == made));

            let mut bad = StoreClient::connect("127.0.0.1", port, timeout)
                .await
                .expect("connect")
                .prefixed("other");
            bad.set(KEY, b"short").await.expect("set");
            let err = exchange(&mut bad, 1, || unreachable!()).await.unwrap_err();
            assert!(err.to_string().contains("5 bytes"), "{err}");
        });
    }
}
