use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::AsyncCommands;

use crate::backend::{RedisBackend, RedisConn};
use crate::codec::ValueCodec;
use cache_core::envelope::Envelope;
use cache_core::CacheKey;
use cache_core::{CacheStore, StoreError, StoreStats};

/// Narratives in Redis, compressed (and sealed when configured), each with its TTL.
#[derive(Debug)]
pub struct RedisStore {
    backend: Arc<RedisBackend>,
    codec: ValueCodec,
    /// Counting entries walks the keyspace, so the count is reused for a while.
    counted: Mutex<Option<(Instant, Counted)>>,
    walking: tokio::sync::Mutex<()>,
    decoded: DecodedValues,
}

/// The last value read for each key and the envelope it decoded to. Every read still
/// goes to Redis; only when Redis answers the very bytes decoded last time is their
/// envelope reused, skipping the decryption and the Brotli decompression (most of a
/// hit's CPU without L1). Equal bytes decode to equal envelopes, so nothing stale can
/// be answered. Bounded by bytes, and no copy is kept longer than [`DECODED_TTL`]
/// (an erased entry's decoded copy on another gateway is gone within that, as its L1
/// copy is within `L1_TTL`).
struct DecodedValues {
    values: moka::sync::Cache<CacheKey, Arc<Decoded>>,
}

struct Decoded {
    raw: Vec<u8>,
    envelope: Arc<Envelope>,
}

/// Bytes of decoded values kept at most.
const DECODED_BYTES: u64 = 32 * 1024 * 1024;
/// The longest a decoded value is kept.
pub const DECODED_TTL: Duration = Duration::from_secs(60);

impl Default for DecodedValues {
    fn default() -> Self {
        Self {
            values: moka::sync::Cache::builder()
                .max_capacity(DECODED_BYTES)
                .weigher(|_, decoded: &Arc<Decoded>| {
                    u32::try_from(decoded.raw.len() + decoded.envelope.body.len() + 256)
                        .unwrap_or(u32::MAX)
                })
                .time_to_live(DECODED_TTL)
                .build(),
        }
    }
}

impl std::fmt::Debug for DecodedValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodedValues")
            .field("entries", &self.values.entry_count())
            .finish()
    }
}

/// Entries in all, and by engine version.
type Counted = (u64, BTreeMap<String, u64>);

/// How long an entry count is reused by `stats`.
const COUNT_REUSE: Duration = Duration::from_secs(10);

impl RedisStore {
    pub fn new(backend: Arc<RedisBackend>, codec: ValueCodec) -> Self {
        Self {
            backend,
            codec,
            counted: Mutex::new(None),
            walking: tokio::sync::Mutex::new(()),
            decoded: DecodedValues::default(),
        }
    }

    /// How values (and live text, `live`) are laid out: compressed, and sealed.
    pub fn codec(&self) -> &ValueCodec {
        &self.codec
    }

    pub fn backend(&self) -> &Arc<RedisBackend> {
        &self.backend
    }

    /// The bytes `put` stores for this envelope under this key. Compression takes
    /// about half a millisecond of CPU, so it runs on the blocking pool, never on an
    /// async worker that is serving requests.
    pub async fn encode(&self, key: &CacheKey, envelope: &Arc<Envelope>) -> Vec<u8> {
        let (codec, name, envelope) = (
            self.codec.clone(),
            key.as_str().to_owned(),
            Arc::clone(envelope),
        );
        let encode = move || codec.encode(&name, &envelope);
        match tokio::task::spawn_blocking(encode.clone()).await {
            Ok(value) => value,
            // The blocking pool is shutting down: encode here rather than lose the value.
            Err(_) => encode(),
        }
    }

    /// Narrative entries only (`narr:*`), never locks, counters or indexes, by walking
    /// the keyspace with `SCAN`, one page (1,000 keys) per call so that each call is
    /// short and bounded. One walk runs at a time; callers meanwhile get the last count,
    /// which is reused for `COUNT_REUSE`. In a Cluster the walk would have to visit every
    /// primary; there `DBSIZE` summed over the primaries is reported instead, an upper
    /// bound that also counts system keys.
    async fn count_entries(&self) -> Result<Counted, StoreError> {
        let last = self
            .counted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some((at, counted)) = &last {
            if at.elapsed() < COUNT_REUSE {
                return Ok(counted.clone());
            }
        }
        let Ok(_walking) = self.walking.try_lock() else {
            return last
                .map(|(_, counted)| counted)
                .ok_or(StoreError::Unavailable(
                    "entry count in progress".to_owned(),
                ));
        };
        let cluster = self
            .backend
            .call(|conn| async move { Ok(matches!(conn, RedisConn::Cluster(_))) })
            .await?;
        let counted = if cluster {
            let total = self
                .backend
                .call(|mut conn| async move { redis::cmd("DBSIZE").query_async(&mut conn).await })
                .await?;
            (total, BTreeMap::new())
        } else {
            let (mut cursor, mut total, mut by_version) = (0u64, 0u64, BTreeMap::new());
            loop {
                let (next, keys): (u64, Vec<String>) = self
                    .backend
                    .call(|mut conn| async move {
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg("narr:*")
                            .arg("COUNT")
                            .arg(1000)
                            .query_async(&mut conn)
                            .await
                    })
                    .await?;
                total += keys.len() as u64;
                for key in &keys {
                    let version = key.split(':').nth(1).unwrap_or("").to_owned();
                    *by_version.entry(version).or_insert(0) += 1;
                }
                if next == 0 {
                    break (total, by_version);
                }
                cursor = next;
            }
        };
        *self.counted.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Instant::now(), counted.clone()));
        Ok(counted)
    }
}

impl RedisStore {
    /// [`CacheStore::get`] as a breaker probe ([`RedisBackend::probe`]): one read that
    /// goes to Redis even while the breaker is open.
    pub async fn probe(&self, key: &CacheKey) -> Result<Option<Arc<Envelope>>, StoreError> {
        let name = key.as_str().to_owned();
        let value: Option<Vec<u8>> = self
            .backend
            .probe(|mut conn| async move { conn.get(name).await })
            .await?;
        self.decoded(key, value)
    }

    fn decoded(
        &self,
        key: &CacheKey,
        value: Option<Vec<u8>>,
    ) -> Result<Option<Arc<Envelope>>, StoreError> {
        let Some(value) = value else {
            self.decoded.values.invalidate(key);
            return Ok(None);
        };
        if let Some(last) = self.decoded.values.get(key) {
            if last.raw == value {
                return Ok(Some(Arc::clone(&last.envelope)));
            }
        }
        match self.codec.decode(key.as_str(), &value) {
            Ok(envelope) => {
                let envelope = Arc::new(envelope);
                self.decoded.values.insert(
                    key.clone(),
                    Arc::new(Decoded {
                        raw: value,
                        envelope: Arc::clone(&envelope),
                    }),
                );
                Ok(Some(envelope))
            }
            Err(error) => {
                self.decoded.values.invalidate(key);
                Err(StoreError::Corrupt(error.to_string()))
            }
        }
    }
}

#[async_trait::async_trait]
impl CacheStore for RedisStore {
    async fn get(&self, key: &CacheKey) -> Result<Option<Arc<Envelope>>, StoreError> {
        let name = key.as_str().to_owned();
        let value: Option<Vec<u8>> = self
            .backend
            .call(|mut conn| async move { conn.get(name).await })
            .await?;
        self.decoded(key, value)
    }

    async fn put(
        &self,
        key: &CacheKey,
        envelope: Arc<Envelope>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let value = self.encode(key, &envelope).await;
        let name = key.as_str().to_owned();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.backend
            .call(|mut conn| async move { conn.pset_ex::<_, _, ()>(name, value, ttl_ms).await })
            .await
    }

    async fn delete(&self, key: &CacheKey) -> Result<bool, StoreError> {
        self.decoded.values.invalidate(key);
        let name = key.as_str().to_owned();
        let removed: u64 = self
            .backend
            .call(|mut conn| async move { conn.del(name).await })
            .await?;
        Ok(removed > 0)
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let (entries, by_version) = self.count_entries().await?;
        let info: String = self
            .backend
            .call(|mut conn| async move {
                redis::cmd("INFO")
                    .arg("memory")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let memory_bytes = info
            .lines()
            .filter_map(|line| line.strip_prefix("used_memory:"))
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum();
        Ok(StoreStats {
            entries,
            memory_bytes,
            by_version,
        })
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}
