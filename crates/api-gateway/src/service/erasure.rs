//! Erasure by user: every entry the user asked for is deleted, with its fill lock
//! revoked and a tombstone left (with Redis), or fenced in process (embedded).

use std::time::Instant;

use cache_core::signals::Signal;
use cache_core::{CacheKey, StoreError};

use super::NarrativeService;

impl NarrativeService {
    /// Erases what is cached for `user_hash`: every entry the user asked for, even if
    /// others share it (they regenerate it). With Redis each is deleted with its fill
    /// lock revoked and a tombstone left ([`cache_core::lock::FillLock::erase`]), and
    /// every instance drops its L1 copy; the index is read again after a flush
    /// interval, for pairs other gateways had not written yet. Returns the entries
    /// deleted.
    pub async fn erase_user(&self, user_hash: &str) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for pass in 0..2 {
            if pass == 1 {
                if self.distributed.is_none() {
                    break;
                }
                tokio::time::sleep(cache_core::user_index::FLUSH_INTERVAL * 3 / 2).await;
            }
            let keys = self.user_index.keys(user_hash).await?;
            let mut erased = Vec::with_capacity(keys.len());
            let mut failure = None;
            for key in keys {
                match self.erase_key(&key).await {
                    Ok(existed) => {
                        deleted += u64::from(existed);
                        erased.push(key);
                    }
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                }
            }
            // What was erased leaves the index; the rest stays for the retry.
            self.user_index.forget(user_hash, &erased).await?;
            if let Some(error) = failure {
                return Err(error);
            }
        }
        Ok(deleted)
    }

    /// Embedded mode's fence: generations that began before now store nothing.
    pub(super) fn fence_locally(&self, key: &CacheKey) {
        let now = Instant::now();
        let mut erased = self
            .erased
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        erased.retain(|_, at| now.duration_since(*at) < self.erasure_tombstone);
        erased.insert(key.clone(), now);
    }

    pub(super) async fn erase_key(&self, key: &CacheKey) -> Result<bool, StoreError> {
        let Some(shared) = &self.distributed else {
            self.fence_locally(key);
            return self.store.delete(key).await;
        };
        let existed = shared.lock().erase(key, self.erasure_tombstone).await?;
        shared.tiers.forget_l1(key);
        if let Err(error) = shared.bus().publish(Signal::Invalidate, key).await {
            tracing::warn!(%error, "could not tell other instances to drop an erased entry; their copies expire with L1_TTL");
        }
        Ok(existed)
    }
}
