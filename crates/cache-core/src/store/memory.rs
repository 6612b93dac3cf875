use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache;

use super::{CacheStore, StoreError, StoreStats};
use crate::envelope::Envelope;
use crate::key::CacheKey;

/// A bounded in-process store with a TTL per entry, evicting the least useful entries
/// (moka's TinyLFU) when its byte budget is full.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    entries: Cache<CacheKey, Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    envelope: Arc<Envelope>,
    ttl: Duration,
}

/// Bytes an entry is charged beyond its text: key, metadata and the map's own nodes.
const ENTRY_OVERHEAD_BYTES: u32 = 256;

struct PerEntryTtl;

impl moka::Expiry<CacheKey, Entry> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        entry: &Entry,
        _now: Instant,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        entry: &Entry,
        _now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

impl MemoryStore {
    /// Drops an entry at once (L1 invalidation from a pub/sub message).
    pub fn forget(&self, key: &CacheKey) {
        self.entries.invalidate(key);
    }

    pub fn new(max_bytes: u64) -> Self {
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &CacheKey, entry: &Entry| {
                let text =
                    key.as_str().len() + entry.envelope.body.len() + entry.envelope.model.len();
                u32::try_from(text)
                    .unwrap_or(u32::MAX)
                    .saturating_add(ENTRY_OVERHEAD_BYTES)
            })
            .expire_after(PerEntryTtl)
            .build();
        Self { entries }
    }
}

#[async_trait::async_trait]
impl CacheStore for MemoryStore {
    fn tier(&self) -> super::Tier {
        super::Tier::Local
    }

    async fn get(&self, key: &CacheKey) -> Result<Option<Arc<Envelope>>, StoreError> {
        Ok(self.entries.get(key).map(|entry| entry.envelope))
    }

    async fn put(
        &self,
        key: &CacheKey,
        envelope: Arc<Envelope>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.entries.insert(key.clone(), Entry { envelope, ttl });
        Ok(())
    }

    async fn delete(&self, key: &CacheKey) -> Result<bool, StoreError> {
        Ok(self.entries.remove(key).is_some())
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        // moka applies inserts and evictions lazily; settle them so the counts are exact.
        self.entries.run_pending_tasks();
        let mut by_version = std::collections::BTreeMap::new();
        for (key, _) in self.entries.iter() {
            *by_version
                .entry(key.engine_version().to_owned())
                .or_insert(0) += 1;
        }
        Ok(StoreStats {
            entries: self.entries.entry_count(),
            memory_bytes: self.entries.weighted_size(),
            by_version,
        })
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::now_ms;

    fn key(n: u8) -> CacheKey {
        CacheKey::parse(&format!(
            "narr:v1:0123456789ab:{{{}}}",
            format!("{n:02x}").repeat(32)
        ))
        .expect("valid key")
    }

    fn envelope(body: &str) -> Arc<Envelope> {
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

    #[tokio::test]
    async fn stores_reads_and_deletes() {
        let store = MemoryStore::new(1 << 20);
        assert!(store.get(&key(1)).await.expect("get").is_none());
        store
            .put(&key(1), envelope("hello"), Duration::from_secs(60))
            .await
            .expect("put");
        assert_eq!(
            store.get(&key(1)).await.expect("get").expect("hit").body,
            "hello"
        );
        assert_eq!(store.stats().await.expect("stats").entries, 1);
        assert!(store.delete(&key(1)).await.expect("delete"));
        assert!(!store.delete(&key(1)).await.expect("delete"));
        assert_eq!(store.stats().await.expect("stats").entries, 0);
    }

    #[tokio::test]
    async fn entries_expire_after_their_ttl() {
        let store = MemoryStore::new(1 << 20);
        store
            .put(&key(1), envelope("short"), Duration::from_millis(30))
            .await
            .expect("put");
        store
            .put(&key(2), envelope("long"), Duration::from_secs(60))
            .await
            .expect("put");
        // moka reads a real monotonic clock, so this waits out the TTL itself.
        std::thread::sleep(Duration::from_millis(60));
        assert!(store.get(&key(1)).await.expect("get").is_none());
        assert!(store.get(&key(2)).await.expect("get").is_some());
    }

    #[tokio::test]
    async fn stays_within_its_byte_budget() {
        let store = MemoryStore::new(64 * 1024);
        let body = "x".repeat(4000);
        for n in 0..64 {
            store
                .put(&key(n), envelope(&body), Duration::from_secs(60))
                .await
                .expect("put");
        }
        let stats = store.stats().await.expect("stats");
        assert!(stats.memory_bytes <= 64 * 1024, "{stats:?}");
        assert!(stats.entries < 64, "{stats:?}");
    }
}
