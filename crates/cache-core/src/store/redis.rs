use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::AsyncCommands;

use super::{CacheStore, StoreError, StoreStats};
use crate::codec::ValueCodec;
use crate::envelope::Envelope;
use crate::key::CacheKey;
use crate::redis_backend::{RedisBackend, RedisConn};

/// Narratives in Redis, compressed (and sealed when configured), each with its TTL.
#[derive(Debug)]
pub struct RedisStore {
    backend: Arc<RedisBackend>,
    codec: ValueCodec,
    /// Counting entries walks the keyspace, so the count is reused for a while.
    counted: Mutex<Option<(Instant, u64)>>,
}

/// How long an entry count is reused by `stats`.
const COUNT_REUSE: Duration = Duration::from_secs(10);

impl RedisStore {
    pub fn new(backend: Arc<RedisBackend>, codec: ValueCodec) -> Self {
        Self {
            backend,
            codec,
            counted: Mutex::new(None),
        }
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
    /// the keyspace with `SCAN`. In a Cluster that walk would have to visit every
    /// primary; there `DBSIZE` summed over the primaries is reported instead, an upper
    /// bound that also counts system keys.
    async fn count_entries(&self) -> Result<u64, StoreError> {
        if let Some((at, count)) = *self.counted.lock().unwrap_or_else(PoisonError::into_inner) {
            if at.elapsed() < COUNT_REUSE {
                return Ok(count);
            }
        }
        let count = self
            .backend
            .call(|mut conn| async move {
                match conn {
                    RedisConn::Single(_) => {
                        let mut cursor: u64 = 0;
                        let mut total = 0u64;
                        loop {
                            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                                .arg(cursor)
                                .arg("MATCH")
                                .arg("narr:*")
                                .arg("COUNT")
                                .arg(1000)
                                .query_async(&mut conn)
                                .await?;
                            total += keys.len() as u64;
                            if next == 0 {
                                return Ok(total);
                            }
                            cursor = next;
                        }
                    }
                    RedisConn::Cluster(_) => redis::cmd("DBSIZE").query_async(&mut conn).await,
                }
            })
            .await?;
        *self.counted.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Instant::now(), count));
        Ok(count)
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
        let Some(value) = value else { return Ok(None) };
        match self.codec.decode(key.as_str(), &value) {
            Ok(envelope) => Ok(Some(Arc::new(envelope))),
            Err(error) => Err(StoreError::Corrupt(error.to_string())),
        }
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
        let name = key.as_str().to_owned();
        let removed: u64 = self
            .backend
            .call(|mut conn| async move { conn.del(name).await })
            .await?;
        Ok(removed > 0)
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let entries = self.count_entries().await?;
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
        })
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}
