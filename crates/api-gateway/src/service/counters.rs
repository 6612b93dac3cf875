//! Hit, miss and fallback counts. Each instance counts in memory (no Redis round trip
//! on the request path) and, in distributed mode, adds what it counted to a shared
//! Redis hash every second, so `hitRate` describes the whole fleet.

use std::sync::atomic::{AtomicU64, Ordering};

use cache_core::StoreError;
use cache_redis::backend::RedisBackend;

/// The shared hash. It has no TTL, so `maxmemory-policy volatile-*` never evicts it.
pub const COUNTERS_KEY: &str = "narrative:counters";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Hit = 0,
    Miss = 1,
    Fallback = 2,
}

const FIELDS: [&str; 3] = ["hits", "misses", "fallbacks"];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub hits: u64,
    pub misses: u64,
    pub fallbacks: u64,
}

impl Totals {
    fn from_array([hits, misses, fallbacks]: [u64; 3]) -> Self {
        Self {
            hits,
            misses,
            fallbacks,
        }
    }
}

#[derive(Debug, Default)]
pub struct Counters {
    counted: [AtomicU64; 3],
    flushed: [AtomicU64; 3],
}

impl Counters {
    pub fn add(&self, count: Count) {
        self.counted[count as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// This instance's counts since start.
    pub fn local(&self) -> Totals {
        Totals::from_array(self.counted.each_ref().map(|c| c.load(Ordering::Relaxed)))
    }

    fn unflushed(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| {
            self.counted[i]
                .load(Ordering::Relaxed)
                .saturating_sub(self.flushed[i].load(Ordering::Relaxed))
        })
    }

    /// Adds what was counted since the last flush to the shared hash.
    pub async fn flush(&self, redis: &RedisBackend) -> Result<(), StoreError> {
        let delta = self.unflushed();
        if delta == [0; 3] {
            return Ok(());
        }
        redis
            .call(|mut conn| async move {
                let mut pipe = redis::pipe();
                for (field, n) in FIELDS.iter().zip(delta) {
                    pipe.cmd("HINCRBY")
                        .arg(COUNTERS_KEY)
                        .arg(*field)
                        .arg(n)
                        .ignore();
                }
                pipe.query_async::<()>(&mut conn).await
            })
            .await?;
        for (flushed, n) in self.flushed.iter().zip(delta) {
            flushed.fetch_add(n, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The fleet's counts: the shared hash plus what this instance has not flushed yet.
    pub async fn global(&self, redis: &RedisBackend) -> Result<Totals, StoreError> {
        let shared: Vec<Option<u64>> = redis
            .call(|mut conn| async move {
                redis::cmd("HMGET")
                    .arg(COUNTERS_KEY)
                    .arg(&FIELDS[..])
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let pending = self.unflushed();
        let mut totals = [0u64; 3];
        for i in 0..3 {
            totals[i] = shared.get(i).copied().flatten().unwrap_or(0) + pending[i];
        }
        Ok(Totals::from_array(totals))
    }
}
