use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{CacheStore, MemoryStore, StoreError, StoreStats, Tier};
use crate::envelope::{now_ms, Envelope};
use crate::key::CacheKey;

/// L1 in process (bounded, short TTL) in front of a shared L2. An L2 hit fills L1;
/// writes go to both, and L1 keeps a value even when L2 refuses it, so an instance
/// keeps serving what it generated while L2 is down. An L1 TTL of zero turns L1 off.
#[derive(Debug)]
pub struct TieredStore {
    l1: MemoryStore,
    l1_ttl: Duration,
    l2: Arc<dyn CacheStore>,
    l2_ttl: Duration,
    l1_hits: AtomicU64,
    l2_hits: AtomicU64,
}

/// Hits served by each tier since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierHits {
    pub l1: u64,
    pub l2: u64,
}

impl TieredStore {
    /// `l2_ttl` is the entries' full lifetime (`CACHE_TTL`), used to bound how long an
    /// L2 hit may stay in L1.
    pub fn new(
        l1: MemoryStore,
        l1_ttl: Duration,
        l2: Arc<dyn CacheStore>,
        l2_ttl: Duration,
    ) -> Self {
        Self {
            l1,
            l1_ttl,
            l2,
            l2_ttl,
            l1_hits: AtomicU64::new(0),
            l2_hits: AtomicU64::new(0),
        }
    }

    pub fn tier_hits(&self) -> TierHits {
        TierHits {
            l1: self.l1_hits.load(Ordering::Relaxed),
            l2: self.l2_hits.load(Ordering::Relaxed),
        }
    }

    /// Drops the L1 copy only (another instance replaced or deleted the entry).
    pub fn forget_l1(&self, key: &CacheKey) {
        self.l1.forget(key);
    }

    /// Puts a copy in L1 only, for a value already written to L2 another way (the
    /// fenced write of a lock holder).
    pub async fn put_l1(&self, key: &CacheKey, envelope: Arc<Envelope>) {
        if let Some(ttl) = self.l1_ttl_for(&envelope) {
            let _ = self.l1.put(key, envelope, ttl).await;
        }
    }

    pub fn l2(&self) -> &Arc<dyn CacheStore> {
        &self.l2
    }

    /// How long L1 may keep this entry: its own TTL, never past the entry's end of
    /// life; `None` when L1 is off.
    fn l1_ttl_for(&self, envelope: &Envelope) -> Option<Duration> {
        if self.l1_ttl.is_zero() {
            return None;
        }
        let age = Duration::from_millis(envelope.age_ms(now_ms()));
        Some(
            self.l1_ttl
                .min(self.l2_ttl.saturating_sub(age))
                .max(Duration::from_millis(1)),
        )
    }
}

#[async_trait::async_trait]
impl CacheStore for TieredStore {
    async fn get(&self, key: &CacheKey) -> Result<Option<Arc<Envelope>>, StoreError> {
        Ok(self.get_traced(key).await?.map(|(envelope, _)| envelope))
    }

    async fn get_traced(
        &self,
        key: &CacheKey,
    ) -> Result<Option<(Arc<Envelope>, Tier)>, StoreError> {
        if !self.l1_ttl.is_zero() {
            if let Some(envelope) = self.l1.get(key).await? {
                self.l1_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Some((envelope, Tier::Local)));
            }
        }
        let found = self.l2.get(key).await?;
        if let Some(envelope) = &found {
            self.l2_hits.fetch_add(1, Ordering::Relaxed);
            self.put_l1(key, Arc::clone(envelope)).await;
        }
        Ok(found.map(|envelope| (envelope, Tier::Shared)))
    }

    async fn put(
        &self,
        key: &CacheKey,
        envelope: Arc<Envelope>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if !self.l1_ttl.is_zero() {
            self.l1
                .put(key, Arc::clone(&envelope), self.l1_ttl.min(ttl))
                .await?;
        }
        self.l2.put(key, envelope, ttl).await
    }

    async fn delete(&self, key: &CacheKey) -> Result<bool, StoreError> {
        let in_l1 = self.l1.delete(key).await?;
        let in_l2 = self.l2.delete(key).await?;
        Ok(in_l1 || in_l2)
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.l2.stats().await
    }

    fn name(&self) -> &'static str {
        self.l2.name()
    }
}
