use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use moka::sync::Cache;

use super::{CacheStore, StoreError, StoreStats};
use crate::envelope::Envelope;
use crate::key::CacheKey;

/// A bounded in-process store with a TTL per entry, evicting the least useful entries
/// (moka's TinyLFU) when its byte budget is full.
///
/// Its entries by engine version are counted as they come and go, so that stats (and
/// every `/metrics` scrape) cost the same with a million entries as with ten.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    entries: Cache<CacheKey, Entry, foldhash::fast::RandomState>,
    by_version: Arc<Mutex<BTreeMap<String, u64>>>,
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
        let by_version: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
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
            // Every entry put is removed once, whatever the cause (replaced, erased,
            // expired, evicted or refused admission): each put counts up, each
            // removal down.
            .eviction_listener({
                let by_version = Arc::clone(&by_version);
                move |key: Arc<CacheKey>, _, _| {
                    let mut counts = by_version.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(count) = counts.get_mut(key.engine_version()) {
                        *count = count.saturating_sub(1);
                        if *count == 0 {
                            counts.remove(key.engine_version());
                        }
                    }
                }
            })
            // Keys are HMAC outputs; a seeded fast hash is all a lookup needs.
            .build_with_hasher(foldhash::fast::RandomState::default());
        Self {
            entries,
            by_version,
        }
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
        *self
            .by_version
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.engine_version().to_owned())
            .or_insert(0) += 1;
        self.entries.insert(key.clone(), Entry { envelope, ttl });
        Ok(())
    }

    async fn delete(&self, key: &CacheKey) -> Result<bool, StoreError> {
        Ok(self.entries.remove(key).is_some())
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        // moka applies inserts and evictions lazily; settle them (and their removal
        // notifications) so the counts are exact.
        self.entries.run_pending_tasks();
        let by_version = self
            .by_version
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
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
    use crate::store::test_support::{envelope, key};

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

    /// The counts kept as entries come and go match a walk over every entry, through
    /// replacement, deletion, expiry and eviction past the byte budget.
    #[tokio::test]
    async fn counts_by_version_follow_every_way_an_entry_leaves() {
        let versioned = |version: &str, n: u32| {
            CacheKey::parse(&format!("narr:{version}:0123456789ab:{{{n:064x}}}")).expect("key")
        };
        let walked = |store: &MemoryStore| {
            let mut counts = BTreeMap::new();
            for (key, _) in store.entries.iter() {
                *counts.entry(key.engine_version().to_owned()).or_insert(0) += 1;
            }
            counts
        };
        let store = MemoryStore::new(256 * 1024);
        let body = "x".repeat(2000);
        for n in 0..200 {
            let version = if n % 3 == 0 { "v1" } else { "v2" };
            let ttl = if n % 7 == 0 {
                Duration::from_millis(20)
            } else {
                Duration::from_secs(60)
            };
            store
                .put(&versioned(version, n), envelope(&body), ttl)
                .await
                .expect("put");
        }
        for n in 0..20 {
            // Replaced, then deleted.
            store
                .put(
                    &versioned("v2", n * 3 + 1),
                    envelope("again"),
                    Duration::from_secs(60),
                )
                .await
                .expect("put");
            store.delete(&versioned("v1", n * 3)).await.expect("delete");
        }
        // Always: the counts add up to what moka holds, expired entries it has not
        // dropped yet included.
        let stats = store.stats().await.expect("stats");
        assert_eq!(stats.by_version.values().sum::<u64>(), stats.entries);
        assert!(stats.entries < 200, "the budget evicted some: {stats:?}");
        // moka drops expired entries on its timer wheel's next tick (about a second):
        // then they match a walk over what is left.
        std::thread::sleep(Duration::from_millis(1_300));
        let stats = store.stats().await.expect("stats");
        assert_eq!(stats.by_version, walked(&store));
        assert_eq!(stats.by_version.values().sum::<u64>(), stats.entries);
    }
}
