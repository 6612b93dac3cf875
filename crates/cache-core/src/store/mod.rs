//! Where envelopes live. Callers hold an `Arc<dyn CacheStore>` chosen once at start-up:
//! [`MemoryStore`] in embedded mode, and [`TieredStore`] (a `MemoryStore` in front of
//! `cache-redis`'s `RedisStore`) when Redis is configured.

mod coalesced;
mod memory;
mod tiered;

use std::sync::Arc;
use std::time::Duration;

pub use coalesced::{CoalescedReads, ReadCounts};
pub use memory::MemoryStore;
pub use tiered::{TierHits, TieredStore};

use crate::envelope::Envelope;
use crate::key::CacheKey;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend did not answer in time; treat as a miss and carry on.
    #[error("cache backend timed out")]
    Timeout,
    /// The backend is down or refused the call; treat as a miss and carry on.
    #[error("cache backend unavailable: {0}")]
    Unavailable(String),
    /// A stored value could not be read back; treat as a miss.
    #[error("stored value unreadable: {0}")]
    Corrupt(String),
    /// Redis answered the call with an error (a wrong type, a script error): it is up,
    /// and asking again will not help.
    #[error("cache backend refused the call: {0}")]
    Refused(String),
}

/// Counts that `GET /narrative/stats` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Narrative entries only (never locks, counters or indexes).
    pub entries: u64,
    pub memory_bytes: u64,
    /// Entries by `ENGINE_VERSION` (empty where the store cannot tell, a Cluster).
    pub by_version: std::collections::BTreeMap<String, u64>,
}

/// Which tier answered a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// This process's memory: L1, or the only store in embedded mode.
    Local,
    /// The shared store (Redis): L2.
    Shared,
}

#[async_trait::async_trait]
pub trait CacheStore: Send + Sync + std::fmt::Debug + 'static {
    async fn get(&self, key: &CacheKey) -> Result<Option<Arc<Envelope>>, StoreError>;
    /// Like `get`, saying which tier had the entry. A single store answers as the tier
    /// it is.
    async fn get_traced(
        &self,
        key: &CacheKey,
    ) -> Result<Option<(Arc<Envelope>, Tier)>, StoreError> {
        let tier = self.tier();
        Ok(self.get(key).await?.map(|envelope| (envelope, tier)))
    }
    /// The tier a single store is (tiered stores answer per read).
    fn tier(&self) -> Tier {
        Tier::Shared
    }
    async fn put(
        &self,
        key: &CacheKey,
        envelope: Arc<Envelope>,
        ttl: Duration,
    ) -> Result<(), StoreError>;
    /// Returns whether an entry was removed.
    async fn delete(&self, key: &CacheKey) -> Result<bool, StoreError>;
    async fn stats(&self) -> Result<StoreStats, StoreError>;
    /// A short name for logs, metrics and `/readyz`.
    fn name(&self) -> &'static str;
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use crate::envelope::{now_ms, Envelope};
    use crate::key::CacheKey;

    pub fn key(n: u8) -> CacheKey {
        CacheKey::parse(&format!(
            "narr:v1:0123456789ab:{{{}}}",
            format!("{n:02x}").repeat(32)
        ))
        .expect("valid key")
    }

    pub fn envelope(body: &str) -> Arc<Envelope> {
        Arc::new(Envelope {
            body: body.into(),
            created_at_ms: now_ms(),
            engine_version: "v1".into(),
            prompt_hash: "0123456789ab".into(),
            model: "m".into(),
            tokens_in: 1,
            tokens_out: 1,
            cost_usd: 0.0,
            generation_ms: 1,
        })
    }
}
