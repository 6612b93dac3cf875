//! Erasure by user: every entry the user asked for is deleted, under the current
//! version and every `PREVIOUS_VERSIONS` one, as the fill strategy deletes it (with its
//! fill lock revoked and a tombstone left with Redis, fenced in process in embedded
//! mode).

use cache_core::{CacheKey, StoreError};

use super::NarrativeService;

impl NarrativeService {
    /// Erases what is cached for `user_hash`: every entry the user asked for, even if
    /// others share it (they regenerate it). With Redis each is deleted with its fill
    /// lock revoked and a tombstone left ([`cache_redis::lock::FillLock::erase`]), and
    /// every instance drops its L1 copy; the index is read again after a flush
    /// interval, for pairs other gateways had not written yet. Returns the entries
    /// deleted.
    pub async fn erase_user(&self, user_hash: &str) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for pass in 0..2 {
            if pass == 1 {
                // Pairs other instances recorded but had not written yet.
                let Some(late) = self.user_index.late_writes_within() else {
                    break;
                };
                tokio::time::sleep(late).await;
            }
            let keys = self.user_index.keys(user_hash).await?;
            let mut erased = Vec::with_capacity(keys.len());
            let mut failure = None;
            for key in keys {
                match self.erase_every_version(&key).await {
                    Ok(existed) => {
                        deleted += existed;
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

    /// Erases `key` and the same profile's entries under every `PREVIOUS_VERSIONS`:
    /// during a rollout a user is answered from those, and the index records the
    /// current key only. Returns how many existed.
    async fn erase_every_version(&self, key: &CacheKey) -> Result<u64, StoreError> {
        let mut existed = u64::from(self.strategy.erase(self, key).await?);
        for previous in self.previous_keys(key) {
            existed += u64::from(self.strategy.erase(self, &previous).await?);
        }
        Ok(existed)
    }
}
